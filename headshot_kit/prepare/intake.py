"""Reading what the user gave: folders, lists of files and zips, then each photo, safely.

This is the part of the prepare stage that touches untrusted input, so it is kept apart: a
folder walk never follows a link out of the folder, a zip entry is never written under its own
name (no path in it can reach outside the scratch folder), entries and files past the size
limits are refused unread, and a photo is decoded with bounded memory (JPEGs at a reduced
scale, others reduced before their colour conversion), turned upright, converted to 8-bit sRGB
and stripped of its metadata. Anything that cannot be used raises `Unusable` with the
sentence the report shows.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from ..config import PrepareConfig
from ..images import GREY

try:  # iPhones save HEIC; pillow-heif teaches Pillow to read it.
    import pillow_heif
except ImportError:
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

# EXIF orientation -> the transpose that makes the photo upright (ImageOps.exif_transpose's
# table). Applied after reducing: transposing a 60 MP photo first would cost its full memory.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


_SRGB = ImageCms.createProfile("sRGB")


@dataclass
class Input:
    """One input file: where to read it, or why it was refused without reading."""

    file: str  # the name the report shows
    path: Path | None = None
    refused: str = ""
    label: str = ""  # the refusal in two words


class Unusable(Exception):
    """A file that cannot be used at all: the report's reason, and a two-word label."""

    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.label = label


def gather(photos: Any, sources: list[Path], scratch: Path, cfg: PrepareConfig,
           skip: Path) -> list[Input]:
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
    inputs: list[Input] = []
    for source, name in zip(sources, names):
        prefix = f"{name}/" if name else ""
        if source.is_dir():
            inputs += _walk(source, prefix, skip)
        elif source.suffix.lower() == ".zip" and source.is_file():
            inputs += _unzip(source, prefix, scratch, cfg)
        elif source.is_file():
            inputs.append(Input(name or source.name, source))
        else:
            inputs.append(Input(name or source.name,
                                refused="The file does not exist (or is a broken link); "
                                        "check the path.", label="missing"))
    return inputs


def _hidden(parts: Iterable[str]) -> bool:
    # .DS_Store, ._AppleDouble twins and __MACOSX folders are metadata, not photos.
    return any((p.startswith(".") and p not in (".", "..")) or p == "__MACOSX" for p in parts)


def _walk(folder: Path, prefix: str, skip: Path) -> list[Input]:
    root = folder.resolve()
    skip = skip.resolve()
    found: list[Input] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are not entered
        here = Path(dirpath)
        for d in list(dirnames):
            if _hidden([d]) or (here / d).resolve() == skip:
                dirnames.remove(d)
            elif (here / d).is_symlink():
                found.append(Input(prefix + (here / d).relative_to(folder).as_posix(),
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
                    found.append(Input(file, refused=f"A link to {target}, outside the photo "
                                                     "folder: refused. Copy the photo into the "
                                                     "folder.", label="link refused"))
                    continue
            found.append(Input(file, path))
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


def _unzip(path: Path, prefix: str, scratch: Path, cfg: PrepareConfig) -> list[Input]:
    dest = Path(tempfile.mkdtemp(dir=scratch))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [Input(prefix.rstrip("/") or path.name,
                      refused=f"Not a readable zip archive ({exc}); zip the photos again.",
                      label="bad zip")]
    found: list[Input] = []
    with archive:
        for i, info in enumerate(archive.infolist()):
            file = prefix + info.filename
            problem = _zip_problem(info, cfg)
            if problem:
                found.append(Input(file, refused=problem[0], label=problem[1]))
                continue
            if info.is_dir() or _hidden(info.filename.replace("\\", "/").split("/")):
                continue
            # Entries are written under a number, never under their own name, so no name can
            # reach outside `dest` whatever it holds; the report keeps the real name.
            target = dest / f"{i:06d}{PurePosixPath(info.filename).suffix[:8]}"
            try:
                _extract_capped(archive, info, target, cfg.max_file_mb * 2**20)
            except Unusable as exc:
                found.append(Input(file, refused=str(exc), label=exc.label))
                continue
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError,
                    EOFError) as exc:  # zlib and zipfile raise these for damaged entries
                found.append(Input(file, refused=f"Could not be extracted from the zip ({exc})"
                                                 "; zip the photos again.", label="bad zip"))
                continue
            found.append(Input(file, target))
    return found


def _extract_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path,
                    limit: int) -> None:
    """Copy one entry out, stopping at `limit` bytes whatever size the entry claims."""
    written = 0
    with archive.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(2**20):
            written += len(chunk)
            if written > limit:
                raise Unusable(f"The entry unpacks past {limit // 2**20} MB (a zip bomb?); "
                               "refused.", "too large")
            dst.write(chunk)


@dataclass
class Loaded:
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


def load(path: Path, cfg: PrepareConfig) -> Loaded:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise Unusable(f"The file could not be opened ({exc.strerror}); check that it still "
                       "exists and can be read.", "cannot open") from None
    if size == 0:
        raise Unusable("The file is empty (0 bytes): copy the photo again from its source.",
                       "empty file")
    if size > cfg.max_file_mb * 2**20:
        raise Unusable(f"The file is {size / 2**20:.0f} MB, over the {cfg.max_file_mb} MB "
                       "limit (max_file_mb); export a smaller copy.", "too large")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _own_pixel_limit():
            try:
                im = Image.open(path)
            except UnidentifiedImageError:
                raise Unusable(_not_a_photo(path), "not a photo") from None
            except Exception as exc:  # damaged headers raise OSError, SyntaxError, ValueError
                raise Unusable(f"The file could not be opened as an image ({exc}); copy the "
                               "photo again or export it as JPEG.", "damaged") from None
        with im:
            loaded = _decode(im, cfg, notes)
    for w in caught:
        if issubclass(w.category, UserWarning) and "EXIF" in str(w.message).upper():
            notes.append(f"EXIF problem: {w.message}")
    return loaded


def _decode(im: Image.Image, cfg: PrepareConfig, notes: list[str]) -> Loaded:
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise Unusable(f"The image claims {w}x{h} pixels ({w * h / 1e6:.0f} MP), over the "
                       f"{cfg.max_pixels / 1e6:.0f} MP limit (max_pixels): a decompression bomb"
                       " or a scan; export a smaller copy.", "too many pixels")
    if min(w, h) < cfg.min_image_side:
        raise Unusable(f"The image is only {w}x{h} pixels, too small to hold a face; use the "
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
        raise Unusable(f"The image data is damaged or cut short ({exc}); copy the photo again "
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
        raise Unusable(f"Colour mode {im.mode} could not be converted to RGB ({exc}); export "
                       "the photo as JPEG.", "colour mode") from None
    image = _reduce(image, work)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
        if orientation >= 5:
            w, h, decoded = h, w, decoded[::-1]
        notes.append(f"turned upright from EXIF orientation {orientation}.")
    image.info = {}  # nothing of the original's metadata (EXIF, GPS, profile) travels on
    return Loaded(image=image, original_size=(w, h), decoded_size=decoded, format=fmt,
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
