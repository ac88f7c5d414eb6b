"""The prepare stage: a handful of selfies in, a clean captioned headshot dataset out.

`prepare_photos(photos, out_dir)` reads a folder, a list of files or a .zip and writes:

    out_dir/images/<name>.png   square head-and-shoulders crops at cfg.resolution, no metadata
    out_dir/metadata.jsonl      Hugging Face imagefolder captions, one line per used photo
    out_dir/report.csv          one row per input file, used or not: why, and every check
    out_dir/contact_sheet.png   every photo with its verdict badges
    out_dir/config.json         the settings that made it

Every photo goes through the same checks (face found, size, framing, sharpness, exposure,
contrast, pose, covered eyes), then the set is checked as a whole (near-duplicates, someone
else's face). A photo with a failed check is skipped; one with warnings is used and listed in
the advice. A file that cannot be read gets a row saying why, and the batch goes on. Originals
are only ever read.

`purge(root)` deletes a subject's uploads, datasets, weights and outputs when they are done.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import stat
import tempfile
import time
import unicodedata
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageCms, ImageDraw, UnidentifiedImageError
from scipy import ndimage
from tqdm.auto import tqdm

from headshot_kit.config import ConfigError, PrepareConfig, save_config
from headshot_kit.faces import Face, FaceModelsMissing, describe_face, detect_faces, face_distance
from headshot_kit.images import font
from headshot_kit.storage import atomic_dir

try:  # iPhones save HEIC; pillow-heif teaches Pillow to read it.
    import pillow_heif
except ImportError:
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

# The report's check columns, in the order a photo goes through them.
CHECKS = ("read", "face", "face_size", "framing", "sharpness", "exposure", "contrast", "pose",
          "eyes", "duplicate", "identity")
REPORT_COLUMNS = (
    "file", "status", "reason", "output", *CHECKS, "chosen_face", "faces", "face_box", "face_px",
    "photo_size", "decoded_size", "format", "upscale", "framing_scale", "padding_pct",
    "sharpness_score", "brightness", "clipped_pct", "contrast_score", "yaw_deg", "roll_deg",
    "eye_ratio", "duplicate_of", "identity_distance", "notes")
# Padding and flattened transparency are neutral grey: black or white would fake an exposure
# problem, and the model sees a flat grey border as what it is.
GREY = (128, 128, 128)
# Face statistics are measured on the face box resized to this side, so a 12 MP selfie and a
# 1 MP photo are judged on the same scale: the detail the crop will actually carry.
MEASURE_SIDE = 128
THUMB_SIDE = 240
# zlib level 3 writes PNGs twice as fast as the default 6, for files about 6% larger.
PNG_LEVEL = 3
_SRGB = ImageCms.createProfile("sRGB")
# EXIF orientation -> the transpose that makes the photo upright (ImageOps.exif_transpose's
# table). Applied after reducing: transposing a 60 MP photo first would cost its full memory.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_VERDICT_COLORS = {"pass": (46, 125, 50), "warn": (217, 119, 6), "fail": (198, 40, 40)}
_VERDICT_CSS = {"pass": "background-color:#e8f5e9", "warn": "background-color:#fff3cd",
                "fail": "background-color:#f8d7da"}


@dataclass
class Check:
    """One check's verdict on one photo."""

    verdict: str  # "pass", "warn" or "fail"
    sentence: str  # what a person reads in the report
    label: str = ""  # two or three words for the advice and the contact sheet badges


@dataclass
class PrepareResult:
    """What `prepare_photos` made; in a notebook it shows the advice and the report."""

    out_dir: Path
    report: pd.DataFrame = field(repr=False)
    advice: list[str]
    n_used: int

    @property
    def contact_sheet(self) -> Path:
        return self.out_dir / "contact_sheet.png"

    def _repr_html_(self) -> str:
        advice = "".join(f"<li>{html.escape(s)}</li>" for s in self.advice)
        table = self.report[["file", "status", "reason", *CHECKS]].fillna("")
        styled = (table.style.hide(axis="index")
                  .map(lambda v: _VERDICT_CSS.get(v, ""), subset=list(CHECKS))
                  .map(lambda v: "font-weight:bold", subset=["status"])
                  # The reason is what people read: room for a sentence, not a word per line.
                  .set_properties(subset=["reason"], **{"min-width": "28em"}))
        # A cell's width holds the table; anything wider scrolls instead of being cut off.
        return (f"<h4>Prepared {self.n_used} of {len(self.report)} photos into "
                f"{html.escape(str(self.out_dir))}</h4><ul>{advice}</ul>"
                f'<div style="overflow-x:auto">{styled.to_html()}</div>')

    def show(self) -> None:
        """Advice, the styled report and the contact sheet, in a notebook cell."""
        from IPython.display import HTML, Image as IPImage, display

        display(HTML(self._repr_html_()))
        display(IPImage(filename=str(self.contact_sheet)))


@dataclass
class _Input:
    """One input file: where to read it, or why it was refused without reading."""

    file: str  # the name the report shows
    path: Path | None = None
    refused: str = ""
    label: str = ""  # the refusal in two words


@dataclass
class _Photo:
    """Everything learned about one input file on its way through the checks."""

    file: str
    order: int
    checks: dict[str, Check] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    crop: Image.Image | None = None
    thumb: Image.Image | None = None
    thumb_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    descriptor: np.ndarray | None = None
    image_hash: np.ndarray | None = None
    yaw: float | None = None
    camera: bool = False
    output: str = ""

    @property
    def used(self) -> bool:
        return self.crop is not None and not self.verdicts("fail")

    def verdicts(self, verdict: str) -> list[Check]:
        return [c for c in self.checks.values() if c.verdict == verdict]


class _Unusable(Exception):
    """A file that cannot be used at all: the report's reason, and a two-word label."""

    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.label = label


# ---------------------------------------------------------------------------------------------
# The public API


def prepare_photos(photos: str | Path | Iterable[str | Path], out_dir: str | Path,
                   cfg: PrepareConfig | None = None) -> PrepareResult:
    """Check `photos` (a folder, a list of files or a .zip) and write a dataset to `out_dir`.

    Every input file gets a row in the report, whether it was used or not. An existing dataset
    in `out_dir` is replaced only once the new one is complete.
    """
    cfg = cfg or PrepareConfig()
    _validate(cfg)
    out_dir = Path(out_dir)
    sources = [Path(photos)] if isinstance(photos, (str, os.PathLike)) else [Path(p) for p in
                                                                            photos]
    _check_out_dir(out_dir, sources)
    with tempfile.TemporaryDirectory(prefix="headshot-prepare-") as scratch:
        inputs = _gather(photos, sources, Path(scratch), cfg, skip=out_dir)
        found = []
        bar = tqdm(inputs, desc="prepare", unit="photo")
        for order, item in enumerate(bar):
            bar.set_postfix_str(item.file[-32:], refresh=False)
            found.append(_examine_safely(item, order, cfg))
    _check_duplicates(found, cfg)
    _check_identity(found, cfg)
    _name_outputs(found)
    report = _report(found)
    n_used = sum(p.used for p in found)
    advice = _advice(found, cfg, out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        lines = []
        for photo in found:
            if photo.used:
                photo.crop.save(tmp / photo.output, format="PNG", compress_level=PNG_LEVEL)
                lines.append(json.dumps({"file_name": photo.output, "text": cfg.caption()},
                                        ensure_ascii=False))
        (tmp / "metadata.jsonl").write_text("".join(f"{line}\n" for line in lines),
                                            encoding="utf-8")
        report.to_csv(tmp / "report.csv", index=False)
        _contact_sheet(found, f"prepare: {n_used} of {len(found)} photos used").save(
            tmp / "contact_sheet.png", compress_level=PNG_LEVEL)
        save_config(cfg, tmp / "config.json", n_inputs=len(found), n_used=n_used)
    return PrepareResult(out_dir=out_dir, report=report, advice=advice, n_used=n_used)


def purge(root_or_paths: str | Path | Iterable[str | Path], older_than_days: float | None = None,
          *, dry_run: bool = False) -> list[Path]:
    """Delete a subject's data: everything under each given folder (or file), and the folder.

    With `older_than_days`, only files last changed longer ago than that go, and folders left
    empty by them; the given folders stay. Links are deleted, never followed, so nothing
    outside the given roots is touched. Folders that hold your home or current folder are
    refused. Returns (and prints a summary of) what was deleted, or would be with `dry_run`.
    """
    roots = ([root_or_paths] if isinstance(root_or_paths, (str, os.PathLike))
             else list(root_or_paths))
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    deleted: list[Path] = []
    for given in roots:
        root = Path(given).expanduser().absolute()
        if not root.exists() and not root.is_symlink():
            continue
        _refuse_broad_root(root)
        if root.is_symlink() or root.is_file():
            if cutoff is None or root.lstat().st_mtime < cutoff:
                deleted.append(_delete(root, dry_run))
            continue
        deleted += _purge_tree(root, cutoff, dry_run)
    size_note = "would delete" if dry_run else "deleted"
    print(f"purge: {size_note} {len(deleted)} paths under {', '.join(str(r) for r in roots)}"
          + (":" if dry_run and deleted else ""))
    if dry_run:  # the list to check before deleting for real
        for line in _outline(deleted, {Path(r).expanduser().absolute() for r in roots}):
            print(f"  {line}")
    return deleted


# ---------------------------------------------------------------------------------------------
# Settings and the output folder


def _validate(cfg: PrepareConfig) -> None:
    if cfg.resolution < 64 or cfg.resolution % 8:
        raise ConfigError(f"resolution is {cfg.resolution}; use a multiple of 8 of at least 64 "
                          "(512 for SD 1.5, 1024 for SDXL).")
    if not 1.0 <= cfg.min_crop_scale <= cfg.crop_scale:
        raise ConfigError(f"crop_scale {cfg.crop_scale} and min_crop_scale {cfg.min_crop_scale}"
                          " must satisfy 1 <= min_crop_scale <= crop_scale.")
    if not cfg.token.strip():
        raise ConfigError("token is empty; give a rare word such as 'ohwx'.")


def _check_out_dir(out_dir: Path, sources: list[Path]) -> None:
    """Refuse an out_dir whose replacement would destroy photos or unrelated files."""
    out = out_dir.resolve()
    for source in sources:
        if source.resolve() == out or out in source.resolve().parents:
            raise ConfigError(f"out_dir {out_dir} holds the input {source}: preparing would "
                              "replace your photos. Choose another out_dir.")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"out_dir {out_dir} is a file; give a folder name.")
        is_dataset = (out_dir / "metadata.jsonl").exists() or (out_dir / "report.csv").exists()
        if any(out_dir.iterdir()) and not is_dataset:
            raise ConfigError(f"out_dir {out_dir} already holds files that are not a prepared "
                              "dataset, and would be replaced; choose an empty or new folder.")


# ---------------------------------------------------------------------------------------------
# Gathering inputs: folders, lists and zips, without ever leaving the folder they name


def _gather(photos: Any, sources: list[Path], scratch: Path, cfg: PrepareConfig,
            skip: Path) -> list[_Input]:
    if isinstance(photos, (str, os.PathLike)):
        if not sources[0].exists():
            raise FileNotFoundError(f"{sources[0]} does not exist: give a folder of photos, a "
                                    "list of photo files or a .zip.")
        names = [""]
    else:
        if not sources:
            raise ValueError("photos is an empty list: give a folder, a .zip or photo files.")
        base = Path(os.path.commonpath([p.absolute().parent for p in sources]))
        names = [p.absolute().relative_to(base).as_posix() for p in sources]
    inputs: list[_Input] = []
    for source, name in zip(sources, names):
        prefix = f"{name}/" if name else ""
        if source.is_dir():
            inputs += _walk(source, prefix, skip)
        elif source.suffix.lower() == ".zip" and source.is_file():
            inputs += _unzip(source, prefix, scratch, cfg)
        elif source.is_file():
            inputs.append(_Input(name or source.name, source))
        else:
            inputs.append(_Input(name or source.name,
                                 refused="The file does not exist (or is a broken link); "
                                         "check the path.", label="missing"))
    return inputs


def _hidden(parts: Iterable[str]) -> bool:
    # .DS_Store, ._AppleDouble twins and __MACOSX folders are metadata, not photos.
    return any((p.startswith(".") and p not in (".", "..")) or p == "__MACOSX" for p in parts)


def _walk(folder: Path, prefix: str, skip: Path) -> list[_Input]:
    root = folder.resolve()
    skip = skip.resolve()
    found: list[_Input] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are not entered
        here = Path(dirpath)
        for d in list(dirnames):
            if _hidden([d]) or (here / d).resolve() == skip:
                dirnames.remove(d)
            elif (here / d).is_symlink():
                found.append(_Input(prefix + (here / d).relative_to(folder).as_posix(),
                                    refused="A link to a folder: links are not followed. Copy "
                                            "the photos into the folder instead.",
                                    label="link refused"))
        for name in filenames:
            if _hidden([name]):
                continue
            path = here / name
            file = prefix + path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    found.append(_Input(file, refused=f"A link to {target}, outside the photo "
                                        "folder: refused. Copy the photo into the folder.",
                                        label="link refused"))
                    continue
            found.append(_Input(file, path))
    return sorted(found, key=lambda i: i.file.casefold())


def _zip_problem(info: zipfile.ZipInfo, cfg: PrepareConfig) -> tuple[str, str] | None:
    """Why a zip entry must not be extracted (reason, label), or None."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return ("Blocked: an absolute path inside the zip, which could write outside the "
                "extraction folder. Zip the photos again from their own folder.", "blocked path")
    if ".." in name.split("/"):
        return ("Blocked: the name climbs out of the zip's folder (../), which could overwrite "
                "other files. Zip the photos again from their own folder.", "blocked path")
    if stat.S_ISLNK(info.external_attr >> 16):
        return "Blocked: a symbolic link inside the zip. Zip the photos themselves.", "blocked link"
    if info.flag_bits & 0x1:
        return ("The entry is password-protected; zip the photos again without a password.",
                "encrypted")
    if info.file_size > cfg.max_file_mb * 2**20:
        return (f"The entry unpacks to {info.file_size / 2**20:.0f} MB, over the "
                f"{cfg.max_file_mb} MB limit (max_file_mb); export a smaller photo.", "too large")
    return None


def _unzip(path: Path, prefix: str, scratch: Path, cfg: PrepareConfig) -> list[_Input]:
    dest = Path(tempfile.mkdtemp(dir=scratch))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [_Input(prefix.rstrip("/") or path.name,
                       refused=f"Not a readable zip archive ({exc}); zip the photos again.",
                       label="bad zip")]
    found: list[_Input] = []
    with archive:
        for i, info in enumerate(archive.infolist()):
            file = prefix + info.filename
            problem = _zip_problem(info, cfg)
            if problem:
                found.append(_Input(file, refused=problem[0], label=problem[1]))
                continue
            if info.is_dir() or _hidden(info.filename.replace("\\", "/").split("/")):
                continue
            # Entries are written under a number, never under their own name, so no name can
            # reach outside `dest` whatever it holds; the report keeps the real name.
            target = dest / f"{i:06d}{PurePosixPath(info.filename).suffix[:8]}"
            try:
                _extract_capped(archive, info, target, cfg.max_file_mb * 2**20)
            except _Unusable as exc:
                found.append(_Input(file, refused=str(exc), label=exc.label))
                continue
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError,
                    EOFError) as exc:  # zlib and zipfile raise these for damaged entries
                found.append(_Input(file, refused=f"Could not be extracted from the zip ({exc})"
                                                  "; zip the photos again.", label="bad zip"))
                continue
            found.append(_Input(file, target))
    return found


def _extract_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path,
                    limit: int) -> None:
    """Copy one entry out, stopping at `limit` bytes whatever size the entry claims."""
    written = 0
    with archive.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(2**20):
            written += len(chunk)
            if written > limit:
                raise _Unusable(f"The entry unpacks past {limit // 2**20} MB (a zip bomb?); "
                                "refused.", "too large")
            dst.write(chunk)


# ---------------------------------------------------------------------------------------------
# Reading one photo: bounded memory, upright, sRGB, 8-bit RGB


@dataclass
class _Loaded:
    image: Image.Image  # upright RGB, long side at most 2x the working side
    original_size: tuple[int, int]  # upright, in the file's pixels
    decoded_size: tuple[int, int]  # upright, as decoded: what the photo cost in memory
    format: str
    notes: list[str]
    camera: bool  # EXIF names a camera: an original rather than a re-export

    @property
    def scale(self) -> float:
        """Loaded pixels per original pixel."""
        return self.image.width / self.original_size[0]


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # Pillow refuses images above twice its own limit inside Image.open, with a message that
    # names no setting of ours. `max_pixels` is checked right after open, before decoding.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _load(path: Path, cfg: PrepareConfig) -> _Loaded:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _Unusable(f"The file could not be opened ({exc.strerror}); check that it still "
                        "exists and can be read.", "cannot open") from None
    if size == 0:
        raise _Unusable("The file is empty (0 bytes): copy the photo again from its source.",
                        "empty file")
    if size > cfg.max_file_mb * 2**20:
        raise _Unusable(f"The file is {size / 2**20:.0f} MB, over the {cfg.max_file_mb} MB "
                        "limit (max_file_mb); export a smaller copy.", "too large")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _own_pixel_limit():
            try:
                im = Image.open(path)
            except UnidentifiedImageError:
                raise _Unusable(_not_a_photo(path), "not a photo") from None
            except Exception as exc:  # damaged headers raise OSError, SyntaxError, ValueError
                raise _Unusable(f"The file could not be opened as an image ({exc}); copy the "
                                "photo again or export it as JPEG.", "damaged") from None
        with im:
            loaded = _decode(im, cfg, notes)
    for w in caught:
        if issubclass(w.category, UserWarning) and "EXIF" in str(w.message).upper():
            notes.append(f"EXIF problem: {w.message}")
    return loaded


def _decode(im: Image.Image, cfg: PrepareConfig, notes: list[str]) -> _Loaded:
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise _Unusable(f"The image claims {w}x{h} pixels ({w * h / 1e6:.0f} MP), over the "
                        f"{cfg.max_pixels / 1e6:.0f} MP limit (max_pixels): a decompression bomb"
                        " or a scan; export a smaller copy.", "too many pixels")
    if min(w, h) < cfg.min_image_side:
        raise _Unusable(f"The image is only {w}x{h} pixels, too small to hold a face; use the "
                        "original photo.", "tiny image")
    fmt = im.format or "?"
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        # Decision: a multi-frame file (animated GIF, MPO stereo pair, HEIC burst) counts as its
        # first frame, the one every viewer shows; skipping it would lose a usable photo.
        notes.append(f"{fmt} with {frames} frames: used the first.")
    icc = im.info.get("icc_profile")
    work = round(cfg.work_side_factor * cfg.resolution)
    factor = work / max(w, h)
    if fmt in ("JPEG", "MPO") and factor < 1:
        # The JPEG decoder scales by 1/2, 1/4 or 1/8 while decoding: a 60 MP photo never sits
        # in memory at full size. Pillow picks the smallest scale still at least this size.
        im.draft(im.mode, (math.ceil(w * factor), math.ceil(h * factor)))
    try:
        im.load()
    except Exception as exc:  # truncated and corrupt files raise OSError, SyntaxError, ...
        raise _Unusable(f"The image data is damaged or cut short ({exc}); copy the photo again "
                        "from the phone or camera.", "damaged") from None
    decoded = im.size
    try:  # read after load: PNG keeps its EXIF chunk after the pixels
        exif = im.getexif()
        orientation = int(exif.get(0x0112, 1))
        camera = bool(exif.get(0x010F) or exif.get(0x0110))  # Make or Model
    except Exception as exc:  # Pillow raises many types for damaged EXIF blocks
        orientation, camera = 1, False
        notes.append(f"EXIF block unreadable ({exc}): orientation not applied.")
    # Formats without draft decoding are box-reduced (cheap and alias-free), before the colour
    # conversion where the mode allows, so a big PNG is converted at its reduced size.
    image = im if im.mode in ("1", "P", "I;16", "I;16L", "I;16B", "I;16N") else _reduce(im, work)
    try:
        image = _to_rgb(image, icc, notes)
    except (ValueError, OSError) as exc:
        raise _Unusable(f"Colour mode {im.mode} could not be converted to RGB ({exc}); export "
                        "the photo as JPEG.", "colour mode") from None
    image = _reduce(image, work)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
        if orientation >= 5:
            w, h, decoded = h, w, decoded[::-1]
        notes.append(f"turned upright from EXIF orientation {orientation}.")
    image.info = {}  # nothing of the original's metadata (EXIF, GPS, profile) travels on
    return _Loaded(image=image, original_size=(w, h), decoded_size=decoded, format=fmt,
                   notes=notes, camera=camera)


def _reduce(im: Image.Image, work: int) -> Image.Image:
    factor = max(im.size) // work
    return im.reduce(factor) if factor >= 2 else im


def _to_rgb(im: Image.Image, icc: bytes | None, notes: list[str]) -> Image.Image:
    """8-bit sRGB from any mode: 16-bit scaled, alpha flattened onto grey, profiles applied."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion clips 16-bit values at 255, turning the photo white.
        values = np.asarray(im, dtype=np.float32)
        top = 1.0 if im.mode == "F" and values.max() <= 1.0 else (
            255.0 if im.mode in ("I", "F") and values.max() <= 255 else 65535.0)
        notes.append(f"{im.mode} pixels scaled to 8 bits.")
        im = Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P"
                                                         and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (*GREY, 255)), rgba)
        notes.append("transparency flattened onto grey.")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if "srgb" not in ImageCms.getProfileDescription(source).lower():
                # Phones save Display P3 and print workflows CMYK: convert, or colours shift.
                im = ImageCms.profileToProfile(im, source, _SRGB, outputMode="RGB")
                notes.append("colour profile converted to sRGB.")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
            notes.append(f"colour profile unusable ({exc}): colours used as stored.")
    return im.convert("RGB")  # always a copy: the caller closes the file-backed original


def _not_a_photo(path: Path) -> str:
    """Say what a file Pillow cannot read actually is, and what to do."""
    with open(path, "rb") as f:
        head = f.read(1024)
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html")) or b"<html" in start[:300]:
        return ("This is a web page (HTML), not a photo: open it in a browser and save the "
                "image itself.")
    if head[4:8] == b"ftyp":
        if head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc") and pillow_heif is None:
            return ("A HEIC photo, and pillow-heif is not installed: run `pip install "
                    "pillow-heif`, or export the photo as JPEG.")
        return "A video or an unsupported HEIF variant, not a photo: export a still as JPEG."
    try:
        head.decode("utf-8")
        return "A text file, not a photo: replace it with the photo itself (JPEG or PNG)."
    except UnicodeDecodeError:
        return ("Not an image format Pillow can read (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC): "
                "convert it to JPEG.")


# ---------------------------------------------------------------------------------------------
# Checking one photo


def _examine_safely(item: _Input, order: int, cfg: PrepareConfig) -> _Photo:
    photo = _Photo(file=item.file, order=order)
    if item.refused:
        photo.checks["read"] = Check("fail", item.refused, item.label)
        return photo
    try:
        _examine(photo, item.path, cfg)
    except _Unusable as exc:
        photo.checks = {"read": Check("fail", str(exc), exc.label)}
    except FaceModelsMissing:
        raise  # an install problem, not a bad photo: every photo would fail the same way
    except Exception as exc:  # one odd file must not stop the batch; the row says what happened
        what = f"{type(exc).__name__}: {exc}"
        photo.checks = {"read": Check("fail", f"Unexpected error while preparing it ({what}); "
                                              "please report it.", "error")}
    return photo


def _examine(photo: _Photo, path: Path, cfg: PrepareConfig) -> None:
    loaded = _load(path, cfg)
    image = loaded.image
    photo.notes += loaded.notes
    photo.camera = loaded.camera
    photo.checks["read"] = Check("pass", f"Read as {loaded.format}.")
    photo.values.update(photo_size="{}x{}".format(*loaded.original_size),
                        decoded_size="{}x{}".format(*loaded.decoded_size), format=loaded.format)
    found = _find_faces(image, cfg)
    photo.values["faces"] = len(found)
    if not found:
        photo.checks["face"] = Check("fail", "No face found: use a photo where your face is "
                                             "clearly visible and turned towards the camera.",
                                     "no face")
        _set_thumb(photo, image, None, None)
        return
    face = found[0]
    photo.checks["face"], photo.values["chosen_face"] = _face_check(found, image.width)
    scale = loaded.scale
    photo.values["face_box"] = ",".join(str(round(v / scale)) for v in face.box)
    photo.values["face_px"] = round(max(face.width, face.height) / scale)
    photo.descriptor = describe_face(*_around(image, face))

    measures = _measure(image, face)
    photo.yaw = measures["yaw_deg"]
    photo.values.update({k: round(v, 3) for k, v in measures.items()})
    for name, check in _quality_checks(measures, cfg).items():
        photo.checks[name] = check

    # Which crop pixels come from the photo: padding is measured, not guessed.
    valid = Image.new("L", image.size, 255)
    roll = measures["roll_deg"]
    if cfg.align_roll and abs(roll) >= 0.5:
        centre = sum(_eyes(face.landmarks)[:2]) / 2
        image, valid = _rotate(image, roll, centre), _rotate(valid, roll, centre)
        face = _rotate_face(face, roll, centre)
        photo.notes.append(f"rotated {roll:.1f} degrees to level the eyes.")
    box, framing = _plan_crop(face, image.size, cfg)
    padding = max(0.0, 1 - float(np.asarray(valid.crop(box), dtype=np.float32).mean()) / 255)
    upscale = cfg.resolution / (box[2] - box[0])
    photo.values.update(upscale=round(upscale, 2), framing_scale=round(framing, 2),
                        padding_pct=round(100 * padding, 1))
    photo.checks["face_size"] = _size_check(upscale, photo.values["face_px"], cfg)
    photo.checks["framing"] = _framing_check(face, image.size, padding, framing, cfg)
    photo.crop = _render(image, valid, box, padding, cfg.resolution)
    _set_thumb(photo, image, face.box, box)


def _find_faces(image: Image.Image, cfg: PrepareConfig) -> list[Face]:
    # Selfie faces are large, so the plain pass finds them at a quarter of the cost of the
    # upsampled one, which runs only when the plain pass finds nothing (small, distant faces).
    found = detect_faces(image, upsample=0, max_side=cfg.detect_max_side)
    if not found and cfg.detect_upsample > 0:
        found = detect_faces(image, upsample=cfg.detect_upsample, max_side=cfg.detect_max_side)
    return found


def _face_check(found: list[Face], width: int) -> tuple[Check, str]:
    if len(found) == 1:
        return Check("pass", "One face found."), "the only face"
    x = found[0].center[0] / width
    where = "on the left" if x < 0.4 else "on the right" if x > 0.6 else "in the middle"
    return (Check("warn", f"{len(found)} faces found: used the largest ({where}); make sure it "
                          "is yours, or crop the others out.", "several faces"),
            f"largest of {len(found)} ({where})")


def _around(image: Image.Image, face: Face) -> tuple[Image.Image, Face]:
    """The face with a margin, and the face in its coordinates: dlib's descriptor needs only
    this much, and copying a 12 MP photo into numpy for it would not be free."""
    margin = max(face.width, face.height) // 2
    left, top = max(0, face.box[0] - margin), max(0, face.box[1] - margin)
    right = min(image.width, face.box[2] + margin)
    bottom = min(image.height, face.box[3] + margin)
    shifted = Face(box=(face.box[0] - left, face.box[1] - top, face.box[2] - left,
                        face.box[3] - top),
                   score=face.score, landmarks=face.landmarks - (left, top))
    return image.crop((left, top, right, bottom)), shifted


def _clip_box(box: tuple[float, ...], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """`box` cut to the image, never empty (a face at the edge still has a pixel to measure)."""
    left = min(max(0, int(box[0])), size[0] - 1)
    top = min(max(0, int(box[1])), size[1] - 1)
    return (left, top, max(min(size[0], math.ceil(box[2])), left + 1),
            max(min(size[1], math.ceil(box[3])), top + 1))


def _luminance(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def _measure(image: Image.Image, face: Face) -> dict[str, float]:
    """Sharpness, exposure, contrast, pose and eye visibility of the chosen face."""
    region = image.crop(_clip_box(face.box, image.size)).resize(
        (MEASURE_SIDE, MEASURE_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    rgb = np.asarray(region, dtype=np.float32)
    grey = _luminance(region)
    # Variance of the Laplacian over the variance of the intensities: blur lowers the first,
    # while a darker or flatter photo lowers both alike.
    sharpness = float(ndimage.laplace(grey).var() / max(float(grey.var()), 1.0))
    p5, p95 = np.percentile(grey, [5, 95])
    yaw, roll = _pose(face.landmarks)
    return {"sharpness_score": sharpness, "brightness": float(grey.mean()),
            "clipped_pct": 100 * float((rgb.max(axis=2) >= 250).mean()),
            "contrast_score": float((p95 - p5) / max(p95 + p5, 1.0)),
            "yaw_deg": yaw, "roll_deg": roll, "eye_ratio": _eye_ratio(image, face.landmarks)}


def _eyes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two eye centres (image-right first) and the nose base, from dlib's 5 points."""
    a, b = landmarks[0:2].mean(axis=0), landmarks[2:4].mean(axis=0)
    return (a, b, landmarks[4]) if a[0] >= b[0] else (b, a, landmarks[4])


def _pose(landmarks: np.ndarray) -> tuple[float, float]:
    """Approximate (yaw, roll) in degrees; yaw > 0 is the nose towards the image's right."""
    right, left, nose = _eyes(landmarks)
    line = right - left
    dist = max(float(np.hypot(*line)), 1e-6)
    roll = math.degrees(math.atan2(line[1], line[0]))
    # The nose base sits about half an eye distance in front of the eyes, so its sideways
    # offset from their midpoint is about 0.5 * tan(yaw) eye distances.
    offset = float(np.dot(nose - (right + left) / 2, line / dist)) / dist
    return math.degrees(math.atan(2 * offset)), roll


def _eye_ratio(image: Image.Image, landmarks: np.ndarray) -> float:
    """Brightness of the eye regions over that of the cheeks and nose: sunglasses are dark."""
    right, left, nose = _eyes(landmarks)
    d = float(np.hypot(*(right - left)))
    eyes = [_luminance(image.crop(_clip_box((c[0] - d / 4, c[1] - d / 8, c[0] + d / 4,
                                              c[1] + d / 8), image.size))).mean()
            for c in (right, left)]
    mid = (right + left) / 2
    cheeks = _luminance(image.crop(_clip_box((mid[0] - 0.8 * d, nose[1] - 0.1 * d,
                                              mid[0] + 0.8 * d, nose[1] + 0.3 * d),
                                             image.size))).mean()
    return float(np.mean(eyes) / max(float(cheeks), 1.0))


def _quality_checks(m: dict[str, float], cfg: PrepareConfig) -> dict[str, Check]:
    checks = {}
    s = m["sharpness_score"]
    if s < cfg.sharpness_fail:
        checks["sharpness"] = Check("fail", f"The face is blurry (sharpness {s:.3f}, needs "
                                            f"{cfg.sharpness_warn}): use a photo in focus, "
                                            "without motion blur.", "blurry")
    elif s < cfg.sharpness_warn:
        checks["sharpness"] = Check("warn", f"The face is a little soft (sharpness {s:.3f}): "
                                            "a sharper photo teaches finer detail.", "soft")
    else:
        checks["sharpness"] = Check("pass", f"Sharp (sharpness {s:.3f}).")
    b, clipped = m["brightness"], m["clipped_pct"] / 100
    if b < cfg.dark_fail:
        checks["exposure"] = Check("fail", f"The face is far too dark (brightness {b:.0f} of "
                                           "255): use a photo taken in better light.",
                                   "too dark")
    elif clipped > cfg.clipped_fail:
        checks["exposure"] = Check("fail", f"The face is blown out: {clipped:.0%} of it is pure"
                                           " white. Use a photo without flash or sun glare on "
                                           "the face.", "blown out")
    elif b < cfg.dark_warn:
        checks["exposure"] = Check("warn", f"The face is dark (brightness {b:.0f} of 255); a "
                                           "brighter photo shows more detail.", "dark")
    elif clipped > cfg.clipped_warn:
        checks["exposure"] = Check("warn", f"{clipped:.0%} of the face is pure white (glare "
                                           "or overexposure).", "bright spots")
    else:
        checks["exposure"] = Check("pass", f"Well exposed (brightness {b:.0f} of 255).")
    c = m["contrast_score"]
    checks["contrast"] = (
        Check("warn", f"The face looks flat or hazy (contrast {c:.2f}): a dirty lens, fog or "
                      "heavy filtering?", "low contrast") if c < cfg.contrast_warn
        else Check("pass", f"Normal contrast ({c:.2f})."))
    yaw, roll = m["yaw_deg"], m["roll_deg"]
    if abs(yaw) > cfg.yaw_warn_deg:
        checks["pose"] = Check("warn", f"The head is turned far to the side (about {abs(yaw):.0f}"
                                       " degrees): keep one or two such photos at most.",
                               "turned away")
    elif abs(roll) > cfg.roll_warn_deg:
        checks["pose"] = Check("warn", f"The head is tilted {abs(roll):.0f} degrees; the model "
                                       "will learn the tilt (align_roll=True levels it).",
                               "tilted")
    else:
        checks["pose"] = Check("pass", f"Head turned about {yaw:.0f} degrees, tilted "
                                       f"{roll:.0f}.")
    e = m["eye_ratio"]
    if e < cfg.eyes_fail:
        checks["eyes"] = Check("fail", f"The eyes look covered (eye area {e:.2f}x as bright as "
                                       "the cheeks): sunglasses, hair or a hand? Use a photo "
                                       "with the eyes visible.", "eyes covered")
    elif e < cfg.eyes_warn:
        checks["eyes"] = Check("warn", f"The eyes are dark (eye area {e:.2f}x as bright as the"
                                       " cheeks): tinted glasses or deep shadow?", "dark eyes")
    else:
        checks["eyes"] = Check("pass", "Eyes visible.")
    return checks


def _rotate(image: Image.Image, roll: float, centre: np.ndarray) -> Image.Image:
    """`image` turned by `roll` degrees about `centre`, so that the eyes become level."""
    return image.rotate(roll, resample=Image.Resampling.BICUBIC, center=tuple(centre))


def _rotate_face(face: Face, roll: float, centre: np.ndarray) -> Face:
    """The face as `_rotate` moves it: landmarks turned, box turned about its centre."""
    turn = math.radians(roll)
    # Pillow rotates counter-clockwise on screen; in y-down pixel coordinates that maps a
    # point p to R(p - c) + c with this matrix.
    matrix = np.array([[math.cos(turn), math.sin(turn)], [-math.sin(turn), math.cos(turn)]])
    landmarks = (face.landmarks - centre) @ matrix.T + centre
    cx, cy = (np.array(face.center) - centre) @ matrix.T + centre
    w, h = face.width / 2, face.height / 2
    return Face(box=(round(cx - w), round(cy - h), round(cx + w), round(cy + h)),
                score=face.score, landmarks=landmarks)


def _place(centre: float, side: int, face_lo: float, face_hi: float, limit: int) -> int:
    """Start of a `side`-long span near `centre` that holds the face and, if possible, stays
    inside [0, limit]."""
    keep_face = (face_hi - side, face_lo)
    inside = (0, limit - side)
    lo, hi = max(keep_face[0], inside[0]), min(keep_face[1], inside[1])
    if lo > hi:  # cannot do both: keep the face, pad the rest
        lo, hi = min(keep_face), max(keep_face)
    return round(min(max(centre - side / 2, lo), hi))


def _plan_crop(face: Face, size: tuple[int, int],
               cfg: PrepareConfig) -> tuple[tuple[int, int, int, int], float]:
    """The square crop box in image pixels, and its side as a multiple of the face."""
    w, h = size
    face_side = max(face.width, face.height)
    # Head and shoulders when the photo allows; tighter (down to min_crop_scale) rather than
    # padding when it does not: a selfie held close has little around the face.
    side = round(max(min(cfg.crop_scale * face_side, w, h), cfg.min_crop_scale * face_side))
    cx, cy = face.center
    cy += cfg.crop_shift_down * face.height
    fl, ft, fr, fb = _clip_box(face.box, size)
    x0 = _place(cx, side, fl, fr, w)
    y0 = _place(cy, side, ft, fb, h)
    return (x0, y0, x0 + side, y0 + side), side / face_side


def _size_check(upscale: float, face_px: int, cfg: PrepareConfig) -> Check:
    if upscale > cfg.upscale_fail:
        return Check("fail", f"The face is too small ({face_px} px wide): the crop would be "
                             f"enlarged {upscale:.1f}x and come out blurry. Use a closer or "
                             "larger photo.", "face too small")
    if upscale > cfg.upscale_warn:
        return Check("warn", f"The face is small ({face_px} px wide): the crop was enlarged "
                             f"{upscale:.1f}x and is a little soft.", "small face")
    return Check("pass", f"Face {face_px} px wide: enough for a {cfg.resolution} px crop.")


def _framing_check(face: Face, size: tuple[int, int], padding: float, framing: float,
                   cfg: PrepareConfig) -> Check:
    inside = _clip_box(face.box, size)
    kept = max(0, inside[2] - inside[0]) * max(0, inside[3] - inside[1])
    outside = 1 - kept / max(face.area, 1)
    if outside > cfg.max_face_outside:
        return Check("fail", f"The face is cut off by the edge of the photo ({outside:.0%} of "
                             "it is outside): use one with the whole head in the frame.",
                     "face cut off")
    if padding > cfg.padding_fail:
        return Check("fail", f"The photo is too tight around the head: {padding:.0%} of the "
                             "crop would be grey padding. Use one showing head and shoulders.",
                     "too tight")
    if padding > 0.005:
        return Check("warn", f"The photo is tight around the head: {padding:.0%} of the crop is "
                             "grey padding, which the model may learn.", "padded")
    if outside > 0:
        return Check("warn", f"The face touches the edge of the photo ({outside:.0%} outside).",
                     "face at edge")
    return Check("pass", f"Head-and-shoulders crop, {framing:.1f}x the face, inside the photo.")


def _render(image: Image.Image, valid: Image.Image, box: tuple[int, int, int, int],
            padding: float, resolution: int) -> Image.Image:
    """The crop at `resolution`, with any part outside the photo flat grey."""
    size = (resolution, resolution)
    if padding == 0:
        crop = image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    else:
        canvas = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), GREY)
        canvas.paste(image.crop(box), mask=valid.crop(box))
        crop = canvas.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    crop.info = {}
    return crop


def _set_thumb(photo: _Photo, image: Image.Image, face_box: tuple[int, ...] | None,
               crop_box: tuple[int, ...] | None) -> None:
    k = THUMB_SIDE / max(image.size)
    photo.thumb = image.resize((max(1, round(image.width * k)), max(1, round(image.height * k))),
                               Image.Resampling.BILINEAR, reducing_gap=2.0)
    photo.thumb_boxes = [tuple(v * k for v in b) for b in (face_box, crop_box) if b]
    photo.image_hash = _dhash(photo.thumb)


def _dhash(image: Image.Image) -> np.ndarray:
    """64-bit difference hash: which neighbour is brighter on a 9x8 thumbnail. It survives
    re-saving, resizing and exposure changes, not a different shot."""
    g = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    return (g[:, 1:] > g[:, :-1]).ravel()


# ---------------------------------------------------------------------------------------------
# Checking the set: near-duplicates and someone else's face


def _own_rank(photo: _Photo) -> tuple:
    """Which of several near-duplicates to keep: fewest failures, fewest warnings, largest
    face, the camera's original over a re-export, then the one listed first."""
    return (len(photo.verdicts("fail")), len(photo.verdicts("warn")),
            -photo.values.get("face_px", 0), not photo.camera, photo.order)


def _check_duplicates(photos: list[_Photo], cfg: PrepareConfig) -> None:
    faced = [p for p in photos if p.descriptor is not None]
    parent = list(range(len(faced)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, a in enumerate(faced):
        for j in range(i + 1, len(faced)):
            b = faced[j]
            same_shot = int((a.image_hash != b.image_hash).sum()) <= cfg.duplicate_hash_bits
            same_face = face_distance(a.descriptor, b.descriptor) <= cfg.duplicate_face_distance
            if same_shot or same_face:
                parent[root(j)] = root(i)
    groups: dict[int, list[_Photo]] = {}
    for i, p in enumerate(faced):
        groups.setdefault(root(i), []).append(p)
    for group in groups.values():
        keep = min(group, key=_own_rank)
        for p in group:
            if p is keep:
                others = len(group) - 1
                p.checks["duplicate"] = Check("pass", f"Kept as the best of {others + 1} "
                                                      "near-duplicates." if others else
                                              "No near-duplicate among the other photos.")
            else:
                p.values["duplicate_of"] = keep.file
                p.checks["duplicate"] = Check("fail", f"A near-duplicate of {keep.file}: it adds"
                                                      " no variety and would be over-learned.",
                                              f"duplicate of {keep.file}")


def _check_identity(photos: list[_Photo], cfg: PrepareConfig) -> None:
    """Flag faces far from the person most photos show (dlib distance to that group's mean)."""
    faced = [p for p in photos if p.descriptor is not None]
    voters = [p for p in faced if p.checks["duplicate"].verdict != "fail"]
    if len(voters) < 2:
        for p in faced:
            p.checks["identity"] = Check("pass", "Only one distinct face photo: nothing to "
                                                 "compare it with.")
        return
    vectors = np.stack([p.descriptor for p in voters])
    dist = np.linalg.norm(vectors[:, None] - vectors[None], axis=2)
    close = dist < cfg.identity_threshold
    # The anchor is the photo with the most same-person neighbours; ties go to the one
    # closest to all others. Its neighbours are "you".
    anchor = min(range(len(voters)), key=lambda i: (-close[i].sum(), dist[i].sum()))
    centroid = vectors[close[anchor]].mean(axis=0)
    for p in faced:
        d = face_distance(p.descriptor, centroid)
        p.values["identity_distance"] = round(d, 3)
        if d >= cfg.identity_threshold:
            p.checks["identity"] = Check(
                "fail", f"Looks like a different person from most photos (face distance {d:.2f};"
                        f" the same person is below {cfg.identity_threshold}).",
                "different person")
        elif d >= cfg.identity_warn:
            p.checks["identity"] = Check("warn", f"Looks less like the other photos (face "
                                                 f"distance {d:.2f}): make sure it is you.",
                                         "weak likeness")
        else:
            p.checks["identity"] = Check("pass", f"Same person as the others (distance "
                                                 f"{d:.2f}).")


# ---------------------------------------------------------------------------------------------
# The report, the advice and the contact sheet


def _name_outputs(photos: list[_Photo]) -> None:
    """images/<name>.png from each used photo's own name: safe characters, unique even when
    two folders hold the same name (and on case-insensitive disks)."""
    taken: set[str] = set()
    for photo in photos:
        if not photo.used:
            continue
        stem = unicodedata.normalize("NFC", PurePosixPath(photo.file).stem)
        slug = re.sub(r"[^\w-]+", "_", stem).strip("_")[:80] or "photo"
        name, k = slug, 2
        while name.casefold() in taken:
            name, k = f"{slug}_{k}", k + 1
        taken.add(name.casefold())
        photo.output = f"images/{name}.png"


def _reason(photo: _Photo) -> str:
    if not photo.used:
        return " ".join(c.sentence for c in photo.verdicts("fail"))
    warned = photo.verdicts("warn")
    if warned:
        return "Used, but: " + " ".join(c.sentence for c in warned)
    return "Used: passed every check."


def _report(photos: list[_Photo]) -> pd.DataFrame:
    rows = []
    for p in photos:
        row = {"file": p.file, "status": "used" if p.used else "skipped", "reason": _reason(p),
               "output": p.output, "notes": " ".join(p.notes)}
        row.update({name: p.checks[name].verdict if name in p.checks else "" for name in CHECKS})
        row.update(p.values)
        rows.append(row)
    report = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    return report.astype({"faces": "Int64", "face_px": "Int64"})


def _listing(photos: list[_Photo], verdict: str) -> str:
    return ", ".join(f"{p.file} ({', '.join(c.label for c in p.verdicts(verdict))})"
                     for p in photos)


def _advice(photos: list[_Photo], cfg: PrepareConfig, out_dir: Path) -> list[str]:
    used = [p for p in photos if p.used]
    # Notes and checksums beside the photos (a README, SHA256SUMS) are not photos to replace.
    others = [p for p in photos if _other_file(p)]
    skipped = [p for p in photos if not p.used and not _other_file(p)]
    warned = [p for p in used if p.verdicts("warn")]
    n_photos = len(photos) - len(others)
    advice = [f"{len(used)} of {n_photos} photos are ready for training in {out_dir}."]
    if others:
        advice.append(f"Left out {len(others)} file{'s' * (len(others) > 1)} that "
                      f"{'are' if len(others) > 1 else 'is'} not a photo: "
                      f"{', '.join(p.file for p in others)}.")
    if skipped:
        advice.append(f"Replace {len(skipped)} photo{'s' * (len(skipped) > 1)}: "
                      f"{_listing(skipped, 'fail')}.")
    if warned:
        advice.append(f"Check {len(warned)} photo{'s' * (len(warned) > 1)} used with warnings: "
                      f"{_listing(warned, 'warn')}.")
    if len(used) < cfg.min_photos:
        advice.append(f"Only {len(used)} usable photo{'s' * (len(used) != 1)}: add at least "
                      f"{cfg.min_photos - len(used)} more; 5-20 varied photos work best.")
    elif len(used) > cfg.max_photos:
        advice.append(f"{len(used)} usable photos: more than {cfg.max_photos} add training time "
                      "without adding likeness; keep the 20 best.")
    if used and all(abs(p.yaw) < cfg.frontal_yaw_deg for p in used):
        advice.append(f"All {len(used)} usable photos face the camera straight on: add 2-3 with "
                      "the head turned a little left and right, so the model learns your face "
                      "from the side.")
    return advice


def _other_file(photo: _Photo) -> bool:
    read = photo.checks.get("read")
    return read is not None and read.label == "not a photo"


def _badges(photo: _Photo) -> list[tuple[str, str]]:
    flagged = [(c.label, c.verdict) for c in photo.checks.values()
               if c.verdict != "pass" and c.label]
    return flagged or [("all checks pass", "pass")]


def _contact_sheet(photos: list[_Photo], title: str, cols: int = 5) -> Image.Image:
    """Every input as a thumbnail (face box white, crop square in the verdict's colour), a
    status bar and one badge per flagged check."""
    cell, bar_h, name_h, badge_h, pad = THUMB_SIDE + 12, 22, 18, 20, 6
    text = font(13)
    n = max(1, len(photos))
    cols = min(cols, n)
    badge_rows = 3
    cell_h = cell + bar_h + name_h + badge_rows * badge_h + pad
    head = 34
    sheet = Image.new("RGB", (cols * cell, head + math.ceil(n / cols) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), title, fill="black", font=font(18))
    for i, p in enumerate(photos):
        x, y = (i % cols) * cell, head + (i // cols) * cell_h
        worst = "fail" if not p.used else "warn" if p.verdicts("warn") else "pass"
        color = _VERDICT_COLORS[worst]
        if p.thumb is not None:
            ox = x + (cell - p.thumb.width) // 2
            oy = y + (cell - p.thumb.height) // 2
            sheet.paste(p.thumb, (ox, oy))
            for j, b in enumerate(p.thumb_boxes):
                shape = (ox + b[0], oy + b[1], ox + b[2], oy + b[3])
                draw.rectangle(shape, outline="white" if j == 0 else color, width=2 + j)
        else:
            draw.rectangle((x + 6, y + 6, x + cell - 6, y + cell - 6), fill=(225, 225, 225))
            draw.text((x + cell // 2 - 8, y + cell // 2 - 20), "?", fill="grey", font=font(40))
        status = {"pass": "USED", "warn": "USED - CHECK", "fail": "SKIPPED"}[worst]
        top = y + cell
        draw.rectangle((x + 6, top, x + cell - 6, top + bar_h - 2), fill=color)
        draw.text((x + 10, top + 3), status, fill="white", font=text)
        draw.text((x + 8, top + bar_h + 1), _shorten(p.file, 30), fill="black", font=text)
        bx, by, row = x + 6, top + bar_h + name_h + 2, 0
        for label, verdict in _badges(p):
            label = _shorten(label, 26)
            width = int(draw.textlength(label, font=text)) + 10
            if bx + width > x + cell - 6 and bx > x + 6:
                row += 1
                bx, by = x + 6, by + badge_h
            if row >= badge_rows:
                break
            draw.rounded_rectangle((bx, by, bx + width, by + badge_h - 3), radius=6,
                                   fill=_VERDICT_COLORS[verdict])
            draw.text((bx + 5, by + 2), label, fill="white", font=text)
            bx += width + 4
    return sheet


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


# ---------------------------------------------------------------------------------------------
# Purging


def _outline(paths: list[Path], roots: set[Path]) -> list[str]:
    """The paths of a dry run, one level into each given folder; a folder that would go whole
    is one line with its file count."""
    gone = set(paths) - roots
    files = [p for p in paths if not p.is_dir() or p.is_symlink()]
    lines = []
    for path in sorted(paths):
        if path.parent in gone or path in roots:
            continue  # listed with its folder, or the given folder itself
        if path in files:
            lines.append(str(path))
        else:
            n = sum(path in f.parents for f in files)
            lines.append(f"{path}/ ({n} file{'s' * (n != 1)})")
    return lines


def _refuse_broad_root(root: Path) -> None:
    real = root.resolve()
    for precious in (Path.home().resolve(), Path.cwd().resolve()):
        if real == precious or real in precious.parents:
            raise ConfigError(f"Refusing to purge {root}: it holds {precious}. Give the "
                              "subject's own folder (its uploads, dataset, LoRA and outputs).")
    if real == Path(real.anchor):
        raise ConfigError(f"Refusing to purge {root}: it is a filesystem root.")


def _delete(path: Path, dry_run: bool) -> Path:
    if dry_run:
        return path
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()
    return path


def _purge_tree(root: Path, cutoff: float | None, dry_run: bool) -> list[Path]:
    deleted: list[Path] = []
    gone: set[Path] = set()  # what is deleted (or would be, in a dry run), to spot empty folders
    touched: set[Path] = set()  # folders this purge deleted something from
    real = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):  # links never entered
        here = Path(dirpath)
        if not here.resolve().is_relative_to(real):  # a folder swapped for a link meanwhile
            raise ConfigError(f"Refusing to purge {here}: it leads outside {root}.")
        links = [d for d in dirnames if (here / d).is_symlink()]
        for name in filenames + links:
            path = here / name
            if cutoff is None or path.lstat().st_mtime < cutoff:
                deleted.append(_delete(path, dry_run))
                gone.add(path)
                touched.add(here)
        # With a cutoff the given folder stays, and sub-folders go only when this purge
        # emptied them (a folder a running stage just made is not touched).
        emptied = all(c in gone for c in here.iterdir()) and (cutoff is None or here in touched)
        if emptied and (here != root or cutoff is None):
            deleted.append(_delete(here, dry_run))
            gone.add(here)
            touched.add(here.parent)
    return deleted
