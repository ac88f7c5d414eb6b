"""The prepare stage on real photos: the right photos are used, the bad ones flagged, and bad
files never stop the batch.

Each scenario runs prepare once (module-scoped fixtures); the tests read its report and files.
Degraded and broken inputs are made at test time in a temporary folder from the sample photos.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from headshot_kit import prepare
from headshot_kit.config import ConfigError, PrepareConfig, get_preset
from headshot_kit.faces import detect_faces, head_pose
from headshot_kit.prepare import CHECKS, prepare_photos
from headshot_kit.prepare.checks import Photo
from headshot_kit.prepare.report import advise
from headshot_kit.lora import LORA_WEIGHTS
from headshot_kit.storage import WORKBENCH_MARKER, made_by, mark_folder, purge


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row(result: prepare.PrepareResult, file: str) -> pd.Series:
    rows = result.report[result.report["file"] == file]
    assert len(rows) == 1, f"{file} should have exactly one report row"
    return rows.iloc[0]


# ---------------------------------------------------------------------------------------------
# The sample set: three Obama photos, Biden, an RGBA duplicate and a face cut by the frame


@pytest.fixture(scope="module")
def sample_run(samples, obama_photos, tmp_path_factory):
    photos = [*obama_photos, samples / "biden.jpg", samples / "32bit.png",
              samples / "obama_partial_face.jpg"]
    before = {p.name: sha256(p) for p in samples.iterdir()}
    result = prepare_photos(photos, tmp_path_factory.mktemp("samples") / "dataset")
    return result, before


def test_every_obama_photo_is_used_and_the_dataset_is_written(sample_run, obama_photos):
    result, _ = sample_run
    for photo in obama_photos:
        r = row(result, photo.name)
        assert r["status"] == "used" and r["face"] == "pass", r["reason"]
        assert (result.out_dir / r["output"]).is_file()
    lines = (result.out_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    used = result.report[result.report["status"] == "used"]
    assert result.n_used == len(used) == len(entries) == 3
    assert sorted(e["file_name"] for e in entries) == sorted(used["output"])
    assert {e["text"] for e in entries} == {"a photo of ohwx person"}
    for e in entries:
        with Image.open(result.out_dir / e["file_name"]) as im:
            assert im.size == (512, 512) and im.mode == "RGB"
    assert sorted(p.name for p in (result.out_dir / "images").iterdir()) == sorted(
        Path(e["file_name"]).name for e in entries)
    saved = json.loads((result.out_dir / "config.json").read_text())
    assert saved["config_type"] == "PrepareConfig" and saved["resolution"] == 512


def test_prepared_crop_is_a_headshot_around_the_face(sample_run):
    result, _ = sample_run
    crop = Image.open(result.out_dir / row(result, "obama.jpg")["output"])
    found = detect_faces(crop)
    assert len(found) == 1
    (cx, cy), width = found[0].center, found[0].width
    # Head and shoulders: the face spans roughly 1/crop_scale of the crop, centred
    # horizontally and above the middle (the crop is shifted down to fit the shoulders).
    assert 0.3 < width / crop.width < 0.55
    assert abs(cx - crop.width / 2) < 0.1 * crop.width
    assert cy < crop.height / 2


def test_biden_among_obama_photos_is_flagged_as_outlier(sample_run, obama_photos):
    result, _ = sample_run
    biden = row(result, "biden.jpg")
    assert biden["identity"] == "fail" and biden["status"] == "skipped"
    assert biden["identity_distance"] > 0.6
    assert "different person" in biden["reason"]
    for photo in obama_photos:
        assert row(result, photo.name)["identity"] == "pass"
    assert any("biden.jpg (different person" in line for line in result.advice)
    # Obama turns his head by 15 and 12 degrees in two of the photos: variety enough.
    assert not any("straight on" in line for line in result.advice)


def test_rgba_copy_is_flagged_as_duplicate_of_the_original(sample_run):
    result, _ = sample_run
    copy = row(result, "32bit.png")
    assert copy["duplicate"] == "fail" and copy["duplicate_of"] == "obama2.jpg"
    assert copy["status"] == "skipped" and "near-duplicate of obama2.jpg" in copy["reason"]
    assert row(result, "obama2.jpg")["duplicate"] == "pass"
    assert "flattened" in copy["notes"]


# Near-duplicates: two ways of being the same shot, each caught by its own measure. Measured
# on these files: the black-and-white copy is 1 bit of the 64-bit hash from its original but
# 0.21 apart in face distance (over duplicate_face_distance, 0.1); the re-framed crop is 24
# bits apart (over duplicate_hash_bits, 10) but 0.03 in face distance. Two distinct photos of
# one person are 26 bits and 0.35 apart: neither measure may call them duplicates.
NEAR_COPIES = {"obama_bw.jpg": "obama.jpg", "obama2_reframed.jpg": "obama2.jpg"}


@pytest.fixture(scope="module")
def near_copies(samples, tmp_path_factory):
    folder = tmp_path_factory.mktemp("near-copies") / "photos"
    folder.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        shutil.copy(samples / name, folder / name)
    with Image.open(samples / "obama.jpg") as im:
        im.convert("L").convert("RGB").save(folder / "obama_bw.jpg", quality=92)
    with Image.open(samples / "obama2.jpg") as im:
        im.convert("RGB").crop((100, 100, 526, 700)).save(folder / "obama2_reframed.jpg",
                                                          quality=92)
    return folder


def duplicates(folder: Path, out: Path, **thresholds) -> dict[str, str]:
    """file -> the file it duplicates ("" for none), from the prepare report."""
    cfg = dataclasses.replace(get_preset("tiny").prepare, **thresholds)
    report = prepare_photos(folder, out, cfg).report.set_index("file")
    assert set(report["duplicate"]) <= {"pass", "fail"}
    return {f: (r["duplicate_of"] if r["duplicate"] == "fail" else "")
            for f, r in report.iterrows()}


def test_a_copy_is_caught_by_its_hash_and_a_crop_by_its_face(near_copies, tmp_path):
    found = duplicates(near_copies, tmp_path / "both")
    assert found == {"obama.jpg": "", "obama2.jpg": "", "biden.jpg": "", **NEAR_COPIES}
    # Each measure alone (the other switched off) catches its own pair, and only it.
    assert duplicates(near_copies, tmp_path / "hash", duplicate_face_distance=-1.0) == {
        "obama.jpg": "", "obama2.jpg": "", "biden.jpg": "", "obama2_reframed.jpg": "",
        "obama_bw.jpg": "obama.jpg"}
    assert duplicates(near_copies, tmp_path / "face", duplicate_hash_bits=-1) == {
        "obama.jpg": "", "obama2.jpg": "", "biden.jpg": "", "obama_bw.jpg": "",
        "obama2_reframed.jpg": "obama2.jpg"}


def test_face_cut_by_the_frame_is_skipped(sample_run):
    r = row(sample_run[0], "obama_partial_face.jpg")
    assert r["framing"] == "fail" and r["status"] == "skipped"
    assert "cut off" in r["reason"]


def test_originals_are_never_modified(sample_run, samples):
    _, before = sample_run
    assert {p.name: sha256(p) for p in samples.iterdir()} == before


def test_prepared_pngs_carry_no_metadata(sample_run):
    result, _ = sample_run
    pngs = list((result.out_dir / "images").glob("*.png"))
    assert pngs
    for png in pngs:
        data = png.read_bytes()
        # The originals carry EXIF with the camera and an ICC profile: none of it may leak.
        for chunk in (b"eXIf", b"tEXt", b"iTXt", b"zTXt", b"iCCP", b"Canon"):
            assert chunk not in data, f"{png.name} holds {chunk!r}"
        with Image.open(png) as im:
            assert not im.getexif() and "exif" not in im.info


def test_report_has_one_row_per_input_and_a_contact_sheet(sample_run):
    result, _ = sample_run
    report = pd.read_csv(result.out_dir / "report.csv")
    assert len(report) == 6
    for column in ("file", "status", "reason", "face_box", "chosen_face", *CHECKS):
        assert column in report.columns
    assert set(report["status"]) == {"used", "skipped"}
    assert report["reason"].str.len().min() > 10  # every row says why
    with Image.open(result.contact_sheet_path) as sheet:
        assert sheet.width >= 5 * 240 and sheet.height > 2 * 240
    page = result._repr_html_()
    assert "biden.jpg" in page and result.advice[0] in page
    assert "#f8d7da" in page  # failed checks are coloured red
    assert "report=" not in repr(result)  # the table is shown as HTML, not dumped


# ---------------------------------------------------------------------------------------------
# One real photo, degraded in one way at a time: each flaw is caught by its own check


def _scaled(image: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * factor, 0, 255)
                           .astype(np.uint8))


def _sunglasses(image: Image.Image) -> Image.Image:
    face = detect_faces(image)[0]
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for eye in (face.landmarks[0:2].mean(axis=0), face.landmarks[2:4].mean(axis=0)):
        draw.ellipse((eye[0] - 32, eye[1] - 20, eye[0] + 32, eye[1] + 22), fill=(12, 12, 14))
    return out


def _with_second_face(image: Image.Image, other: Image.Image) -> Image.Image:
    """A smaller second person (Biden's head) in the lower right corner."""
    out = image.copy()
    out.paste(other.crop((380, 160, 820, 640)).resize((220, 240)), (680, 600))
    return out


def _sideways_with_exif(image: Image.Image, path: Path) -> None:
    """Pixels stored turned 90 degrees, with EXIF orientation 6 saying how to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif)


@pytest.fixture(scope="module")
def degraded(samples, tmp_path_factory):
    """name -> (report row, result); each variant prepared on its own, so that no variant is a
    near-duplicate of another."""
    root = tmp_path_factory.mktemp("degraded")
    src = Image.open(samples / "obama.jpg").convert("RGB")
    variants = {
        "clean": src,
        "blurred": src.filter(ImageFilter.GaussianBlur(5)),
        "dark": _scaled(src, 0.15),
        "blown": _scaled(src, 3.0),
        "tiny": src.resize((227, 284), Image.Resampling.LANCZOS),
        "sunglasses": _sunglasses(src),
        "flat": ImageEnhance.Contrast(src).enhance(0.25),
        "tilted": src.rotate(25, resample=Image.Resampling.BICUBIC, expand=True,
                             fillcolor=(128, 128, 128)),
        "two_faces": _with_second_face(src, Image.open(samples / "biden.jpg").convert("RGB")),
        # Close crops around the face (box about 378,158-625,405): head-and-shoulders framing
        # needs more photo than there is.
        "tight": src.crop((320, 60, 680, 520)).resize((540, 690), Image.Resampling.LANCZOS),
        "too_tight": src.crop((330, 110, 675, 455)),
        "rotated": None,
    }
    runs = {}
    for name, image in variants.items():
        folder = root / name
        folder.mkdir()
        if image is None:
            _sideways_with_exif(src, folder / f"{name}.jpg")
        else:
            image.save(folder / f"{name}.jpg", quality=92)
        result = prepare_photos(folder, root / f"{name}_out")
        runs[name] = (row(result, f"{name}.jpg"), result)
    return runs


@pytest.mark.parametrize("name, check, verdict", [
    ("blurred", "focus", "fail"),
    ("dark", "exposure", "fail"),
    ("blown", "exposure", "fail"),
    ("tiny", "face_size", "fail"),
    ("sunglasses", "eyes", "fail"),
    ("flat", "haze", "warn"),
    ("tilted", "pose", "warn"),
    ("two_faces", "face", "warn"),
    ("tight", "framing", "warn"),
    ("too_tight", "framing", "fail"),
])
def test_each_degradation_is_caught_by_its_own_check(degraded, name, check, verdict):
    r, _ = degraded[name]
    assert r["faces"] >= 1, "the face must still be found, so the right check can judge it"
    assert r[check] == verdict, r["reason"]
    assert r["status"] == ("skipped" if verdict == "fail" else "used")
    # Only that flaw: the others are judged as in the clean photo (a blown-out face also
    # loses contrast, which is right to say).
    clean, _ = degraded["clean"]
    expected_extra = {"blown": {"haze"}}.get(name, set())
    differing = {c for c in CHECKS if r[c] != clean[c]}
    assert differing == {check} | expected_extra, r["reason"]


def test_largest_face_is_chosen_and_said_so(degraded):
    r, _ = degraded["two_faces"]
    assert r["faces"] == 2 and r["chosen_face"] == "largest of 2 (in the middle)"
    assert r["face_box"] == degraded["clean"][0]["face_box"]  # Obama's, not Biden's
    assert "used the largest" in r["reason"]


def test_padding_is_flat_grey_and_reported(degraded):
    r, result = degraded["tight"]
    assert 0 < r["padding_pct"] < 30 and "grey padding" in r["reason"]
    crop = np.asarray(Image.open(result.out_dir / r["output"]), np.int16)
    grey_rows = np.all(np.abs(crop - 128) <= 1, axis=(1, 2))
    grey_cols = np.all(np.abs(crop - 128) <= 1, axis=(0, 2))
    # The grey band is where the photo ends, about as wide as the reported share.
    assert grey_rows.any() or grey_cols.any()
    share = 1 - (~grey_rows).sum() * (~grey_cols).sum() / grey_rows.size ** 2
    assert abs(100 * share - r["padding_pct"]) < 5
    # The face mask gives the padding no weight: it is not part of the photo.
    mask = np.asarray(Image.open(result.out_dir / r["output"].replace("images/", "masks/")))
    assert mask[grey_rows].max(initial=0) == 0 and mask[:, grey_cols].max(initial=0) == 0


def test_clean_photo_passes_every_check(degraded):
    r, result = degraded["clean"]
    assert r["status"] == "used"
    assert all(r[c] == "pass" for c in CHECKS), r["reason"]
    assert any("face the camera straight on" in line for line in result.advice)
    assert any("Only 1 usable photo" in line for line in result.advice)


def test_advice_counts_usable_photos():
    def used(yaw: float) -> Photo:
        return Photo(file=f"{yaw}.jpg", order=0, crop=Image.new("RGB", (8, 8)),
                              yaw=yaw)

    cfg = PrepareConfig()
    many = advise([used(y) for y in np.linspace(-20, 20, 31)], cfg, Path("out"))
    assert any(line.startswith("31 usable photos: more than 30") for line in many)
    assert not any("straight on" in line for line in many)
    frontal = advise([used(2.0)] * 6, cfg, Path("out"))
    assert any("All 6 usable photos face the camera straight on" in line for line in frontal)
    assert not any("usable photos: more than" in line or "Only" in line for line in frontal)


def test_exif_rotated_photo_is_read_upright_and_not_flagged(degraded):
    r, result = degraded["rotated"]
    clean, clean_result = degraded["clean"]
    assert r["status"] == "used"
    assert all(r[c] == clean[c] for c in CHECKS), r["reason"]
    assert r["photo_size"] == clean["photo_size"] == "910x1137"
    assert "EXIF orientation 6" in r["notes"]
    ours = np.asarray(Image.open(result.out_dir / r["output"]), np.float32)
    theirs = np.asarray(Image.open(clean_result.out_dir / clean["output"]), np.float32)
    assert np.abs(ours - theirs).mean() < 6  # the same crop, up to JPEG re-encoding


def test_align_roll_levels_the_eyes(samples, tmp_path):
    tilted = Image.open(samples / "obama.jpg").convert("RGB").rotate(
        15, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    tilted.save(tmp_path / "tilted.jpg", quality=92)
    plain = prepare_photos([tmp_path / "tilted.jpg"], tmp_path / "plain")
    aligned = prepare_photos([tmp_path / "tilted.jpg"], tmp_path / "aligned",
                             PrepareConfig(align_roll=True))
    assert abs(row(plain, "tilted.jpg")["roll_deg"]) > 12
    for result, limit in ((plain, None), (aligned, 3)):
        crop = Image.open(result.out_dir / row(result, "tilted.jpg")["output"])
        roll = head_pose(detect_faces(crop)[0].landmarks)[1]
        assert (abs(roll) < limit) if limit else abs(roll) > 12
    assert "level the eyes" in row(aligned, "tilted.jpg")["notes"]


# ---------------------------------------------------------------------------------------------
# Bad and unusual files: one row each, and the batch goes on


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _corrupt_exif(jpeg: bytes) -> bytes:
    """An APP1 EXIF block whose directory points far past its end."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x02" + b"\x01\x12\x00\x03\x00\x00\x00\x01" \
        + b"\xff\xff\xff\xf0" + b"\xff" * 20
    segment = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


# file -> ("used" or a phrase the skip reason must contain)
BAD_INPUTS = {
    "empty.jpg": "empty",
    "truncated.jpg": "damaged or cut short",
    "truncated.png": "damaged",
    "notes.jpg": "text file",
    "page.jpg": "web page",
    "random.jpg": "not an image format",
    "clip.heic": "video",
    # Our own limit, checked before decoding: Pillow alone would refuse the first with its own
    # message, and would only warn about the second, then try to decode 144 MP.
    "bomb.png": "over the 120 MP limit (max_pixels)",
    "bomb_144mp.png": "over the 120 MP limit (max_pixels)",
    "one_pixel.png": "only 1x1 pixels",
    "link_outside.jpg": "outside the photo folder",
    "linked_folder": "links are not followed",
    "huge_60mp.jpg": "used",
    "animated.gif": "used",
    "bad_exif.jpg": "used",
    "cmyk.jpg": "used",
    "grey.png": "used",
    "palette.png": "used",
    "sixteen_bit.png": "used",
    "transparent.png": "used",
    "photo.webp": "used",
    "photo.bmp": "used",
    "photo.tiff": "used",
    "photo.heic": "used",
    "stereo.mpo": "used",
}


@pytest.fixture(scope="module")
def bad_run(samples, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    folder, outside = root / "photos", root / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    raw = (samples / "obama.jpg").read_bytes()
    # Half size keeps the 20-odd face detections quick; the face is still 120 px wide.
    photo = Image.open(samples / "obama.jpg").convert("RGB").reduce(2)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    png = io.BytesIO()
    photo.save(png, format="PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "notes.jpg").write_text("my best photos, in order of preference\n")
    (folder / "page.jpg").write_text("<!DOCTYPE html><html><body><img src='me.jpg'></body>")
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "clip.heic").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    (folder / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    (folder / "bomb_144mp.png").write_bytes(_png_header_only(12_000, 12_000))
    Image.new("RGB", (1, 1), "white").save(folder / "one_pixel.png")
    photo.save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", folder / "link_outside.jpg")
    os.symlink(outside, folder / "linked_folder")
    big = Image.open(samples / "obama.jpg").convert("RGB").resize((6930, 8658),
                                                                   Image.Resampling.BILINEAR)
    big.save(folder / "huge_60mp.jpg", quality=80)
    del big
    frames = [photo.convert("P", palette=Image.Palette.ADAPTIVE),
              Image.new("P", photo.size, 0)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:],
                   duration=200, loop=0)
    (folder / "bad_exif.jpg").write_bytes(_corrupt_exif(raw))
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("L").save(folder / "grey.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    sixteen = (np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "sixteen_bit.png")
    rgba = photo.convert("RGBA")
    alpha = Image.new("L", photo.size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, photo.width // 5, photo.height), fill=0)
    rgba.putalpha(alpha)
    rgba.save(folder / "transparent.png")
    photo.save(folder / "photo.webp", quality=90)
    photo.save(folder / "photo.bmp")
    photo.save(folder / "photo.tiff")
    photo.save(folder / "photo.heic")
    photo.save(folder / "stereo.mpo", format="MPO", save_all=True, append_images=[photo])
    outside_hash = sha256(outside / "secret.jpg")
    # Every good file here is the same photo: switch the duplicate check off, so that each
    # file is judged on whether it could be read.
    cfg = PrepareConfig(duplicate_hash_bits=-1, duplicate_face_distance=-1.0)
    result = prepare_photos(folder, root / "out", cfg)
    return result, outside / "secret.jpg", outside_hash


def test_bad_inputs_get_one_row_each_and_the_batch_goes_on(bad_run):
    result, _, _ = bad_run
    assert sorted(result.report["file"]) == sorted(BAD_INPUTS)
    for file, expected in BAD_INPUTS.items():
        r = row(result, file)
        if expected == "used":
            assert r["status"] == "used", f"{file}: {r['reason']}"
        else:
            assert r["status"] == "skipped" and r["read"] == "fail", file
            assert expected.lower() in r["reason"].lower(), f"{file}: {r['reason']}"
    n_good = sum(v == "used" for v in BAD_INPUTS.values())
    assert result.n_used == n_good
    assert len(list((result.out_dir / "images").iterdir())) == n_good


def test_sixty_megapixel_photo_is_decoded_reduced(bad_run):
    r = row(bad_run[0], "huge_60mp.jpg")
    assert r["photo_size"] == "6930x8658"
    w, h = map(int, r["decoded_size"].split("x"))
    assert w * h < 6_000_000, "JPEG draft decoding should never hold the full 60 MP"


def test_unusual_formats_are_converted_correctly(bad_run):
    result, _, _ = bad_run
    assert "frames: used the first" in row(result, "animated.gif")["notes"]
    assert "frames: used the first" in row(result, "stereo.mpo")["notes"]
    assert "flattened onto grey" in row(result, "transparent.png")["notes"]
    grey, sixteen = row(result, "grey.png"), row(result, "sixteen_bit.png")
    # 16-bit data scaled, not clipped at 255 (which would turn the photo white).
    assert abs(sixteen["brightness"] - grey["brightness"]) < 0.01
    assert sixteen["exposure"] == "pass"
    assert row(result, "cmyk.jpg")["exposure"] == "pass"


def test_link_target_outside_the_folder_is_never_read_or_touched(bad_run):
    result, secret, secret_hash = bad_run
    assert sha256(secret) == secret_hash
    assert "secret" not in " ".join(result.report["output"].fillna(""))


def test_names_are_made_safe_and_unique(obama_photos, tmp_path):
    folder = tmp_path / "photos"
    for sub, photo in (("a", obama_photos[0]), ("b", obama_photos[1])):
        (folder / sub).mkdir(parents=True)
        shutil.copy(photo, folder / sub / "same name.JPG")
    shutil.copy(obama_photos[2], folder / "Jöhn Smíth (1).jpg")
    result = prepare_photos(folder, tmp_path / "out")
    assert result.n_used == 3
    outputs = sorted(result.report["output"])
    assert outputs == ["images/Jöhn_Smíth_1.png", "images/same_name.png",
                       "images/same_name_2.png"]
    assert all((result.out_dir / o).is_file() for o in outputs)


# ---------------------------------------------------------------------------------------------
# Zips


def test_zip_entries_cannot_escape_the_extraction_folder(obama_photos, tmp_path):
    archive = tmp_path / "upload" / "photos.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        # writestr keeps names as given (zf.write would clean them up, as an attacker won't).
        zf.writestr("me/obama.jpg", obama_photos[0].read_bytes())
        for name in ("../evil.jpg", "me/../../../climb.jpg", "/abs.jpg", "..\\windows.jpg"):
            zf.writestr(name, obama_photos[1].read_bytes())
        link = zipfile.ZipInfo("me/link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("__MACOSX/me/._obama.jpg", b"\x00\x05\x16\x07")
        zf.writestr("me/big.bin", bytes(3 * 2**20))
    result = prepare_photos(archive, tmp_path / "out", PrepareConfig(max_file_mb=2))
    assert row(result, "me/obama.jpg")["status"] == "used"
    for name in ("../evil.jpg", "me/../../../climb.jpg", "/abs.jpg", "..\\windows.jpg",
                 "me/link.jpg"):
        r = row(result, name)
        assert r["status"] == "skipped" and r["reason"].startswith("Blocked"), name
    assert "over the 2 MB limit" in row(result, "me/big.bin")["reason"]
    assert not any("__MACOSX" in f for f in result.report["file"])
    for stray in ("evil.jpg", "climb.jpg", "abs.jpg", "windows.jpg"):
        assert not list(tmp_path.rglob(stray)) and not Path("/", stray).exists()


# ---------------------------------------------------------------------------------------------
# The output folder


def test_existing_dataset_is_replaced_only_when_the_new_one_is_complete(obama_photos, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "dataset"
    first = prepare_photos([obama_photos[0]], out)
    assert (out / "images" / "obama.png").is_file()

    def crash(*args, **kwargs):
        raise RuntimeError("disconnected")

    monkeypatch.setattr(prepare, "verdict_sheet", crash)
    with pytest.raises(RuntimeError):
        prepare_photos([obama_photos[1]], out)
    assert (out / "images" / "obama.png").is_file()  # the old dataset is intact
    assert pd.read_csv(out / "report.csv")["file"].tolist() == ["obama.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]  # no temp folder left
    monkeypatch.undo()
    second = prepare_photos([obama_photos[1]], out)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["obama2.png"]
    assert first.out_dir == second.out_dir


def test_out_dir_that_would_destroy_photos_or_other_files_is_refused(obama_photos, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(obama_photos[0], photos)
    with pytest.raises(ConfigError, match="replace your photos"):
        prepare_photos(photos, photos)
    with pytest.raises(ConfigError, match="replace your photos"):
        prepare_photos(photos / "obama.jpg", tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        prepare_photos(photos, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="multiple of 8"):
        prepare_photos(photos, tmp_path / "out", PrepareConfig(resolution=500))


# ---------------------------------------------------------------------------------------------
# Purge


def _subject(root: Path) -> dict[str, Path]:
    files = {"upload": root / "uploads" / "me.jpg",
             "image": root / "prepared" / "images" / "me.png",
             "lora": root / "lora" / "pytorch_lora_weights.safetensors",
             "checkpoint": root / "checkpoints" / "step-100" / "state.pt",
             "output": root / "outputs" / "corporate-0.png"}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return files


def test_purge_deletes_old_files_only_and_never_leaves_the_root(tmp_path):
    root = tmp_path / "subject"
    files = _subject(root)
    keep_outside = tmp_path / "shared" / "base_model.safetensors"
    keep_outside.parent.mkdir()
    keep_outside.write_bytes(b"weights")
    os.symlink(keep_outside, root / "lora" / "base.safetensors")
    os.symlink(keep_outside.parent, root / "shared_link")
    (root / "outputs" / "fresh").mkdir()  # made just now by a running stage: must stay
    month_ago = time.time() - 30 * 86400
    for name in ("upload", "checkpoint"):
        os.utime(files[name], (month_ago, month_ago))

    planned = purge(root, older_than_days=7, dry_run=True)
    assert files["upload"].exists()
    deleted = purge(root, older_than_days=7)
    assert deleted == planned
    assert set(deleted) >= {files["upload"], files["checkpoint"]}
    assert not files["upload"].exists() and not files["checkpoint"].parent.exists()
    assert files["lora"].exists() and files["image"].exists()
    assert (root / "outputs" / "fresh").is_dir()

    deleted = purge(root)
    assert root in deleted and not root.exists()
    assert keep_outside.read_bytes() == b"weights"  # links were removed, not followed


def _age(folder: Path, days: float) -> None:
    """Every file and folder under `folder` last changed `days` ago."""
    then = time.time() - days * 86400
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        os.utime(path, (then, then), follow_symlinks=False)


def _write(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def _work_folder(root: Path) -> None:
    """A work folder every stage has written into: stage folders, no marker of its own."""
    _write(root, "photos/me.jpg", "prepared/metadata.jsonl", "prepared/images/me.png",
           f"lora/{LORA_WEIGHTS}", "lora/checkpoints/checkpoint-0000030/meta.json",
           "headshots/manifest.csv", "headshots/images/corporate-0.png", "scores/scores.csv")
    for stage in ("lora", "headshots", "scores"):
        mark_folder(root / stage, stage)


def _lora_folder(root: Path) -> None:
    """A LoRA folder the train stage marked, with two runs' checkpoints and a chosen best."""
    root.mkdir(parents=True)
    mark_folder(root, "train")
    _write(root, LORA_WEIGHTS, "config.json", "metrics.csv", "loss.png",
           "checkpoints/checkpoint-0000010/meta.json", "checkpoints/checkpoint-0000020/meta.json",
           f"best/{LORA_WEIGHTS}")


@pytest.mark.parametrize("make", [_work_folder, _lora_folder], ids=["work", "lora"])
def test_an_age_purge_that_empties_its_folder_keeps_the_folder_and_its_marker(make, tmp_path):
    """Everything older than the cutoff goes; the folder given stays, and so does the marker
    that says the workbench made it, so the workbench still knows it (a later purge of it is
    not refused as someone else's folder)."""
    root = tmp_path / "subject"
    make(root)
    had_marker = (root / WORKBENCH_MARKER).is_file()
    _age(root, 30)
    deleted = purge(root, older_than_days=7)
    assert root.is_dir() and root not in deleted
    left = sorted(p.name for p in root.iterdir())
    assert left == ([WORKBENCH_MARKER] if had_marker else []), left
    if had_marker:
        assert made_by(root) == "train"
        assert root in purge(root) and not root.exists()


def test_an_age_purge_keeps_the_newer_runs_of_a_sweep(tmp_path):
    root = tmp_path / "sweep"
    runs = {"rank=2": 30, "rank=4": 1}  # days since each run last wrote
    for run, days in runs.items():
        _write(root / run, f"lora/{LORA_WEIGHTS}", "lora/checkpoints/checkpoint-0000010/meta.json",
               "scores/scores.csv", "done.json", "attempts.jsonl")
        mark_folder(root / run / "lora", "train")
        mark_folder(root / run / "scores", "evaluate")
        _age(root / run, days)
    _write(root, "experiments.csv")  # the newer run added its row
    kept = sorted(p.relative_to(root) for p in (root / "rank=4").rglob("*"))
    purge(root, older_than_days=7)
    assert not (root / "rank=2").exists()
    assert sorted(p.relative_to(root) for p in (root / "rank=4").rglob("*")) == kept
    assert (root / "experiments.csv").is_file()


def test_purge_refuses_folders_holding_home_or_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    for broad in (tmp_path, tmp_path.parent, Path.home(), Path("/")):
        with pytest.raises(ConfigError, match="Refusing to purge"):
            purge(broad)
    assert (tmp_path / "keep.txt").exists()
    assert purge(tmp_path / "never-made") == []


def test_the_demo_samples_are_photos_and_pass_the_demos_own_advice():
    """The folder the demo reads holds photos only (its provenance lies one folder up), and
    the tiny preset the demo runs asks for no more usable photos than it has."""
    import tempfile

    from headshot_kit.demo import samples_dir
    from headshot_kit.workspace import list_photos

    assert sorted(p.name for p in samples_dir().iterdir()) == sorted(
        p.name for p in list_photos(samples_dir()))
    assert (samples_dir().parent / "PROVENANCE.md").is_file()
    with tempfile.TemporaryDirectory() as out:
        result = prepare_photos(samples_dir(), Path(out) / "prepared", get_preset("tiny").prepare)
    assert result.advice[0].startswith("3 of 6 photos are ready")
    assert not [line for line in result.advice if line.startswith(("Only", "Left out"))]
    # A real preset keeps the usual minimum, and says so for the same three photos.
    assert get_preset("sd15-t4").prepare.min_photos == 5


def test_notes_beside_the_photos_are_not_photos_to_replace(samples, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(samples, folder)
    for note in ("PROVENANCE.md", "SHA256SUMS"):
        shutil.copy(samples.parent / note, folder / note)
    result = prepare_photos(folder, tmp_path / "out", get_preset("tiny").prepare)
    replace = next(line for line in result.advice if line.startswith("Replace"))
    assert "PROVENANCE.md" not in replace and "SHA256SUMS" not in replace
    assert "Left out 2 files that are not a photo: PROVENANCE.md, SHA256SUMS." in result.advice
    assert result.advice[0].startswith("3 of 6 photos are ready")


def test_purge_dry_run_lists_what_it_would_delete(tmp_path, capsys):
    root = tmp_path / "work"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "me.jpg").write_bytes(b"x")
    (root / "prepared").mkdir()  # a work folder: the prepare stage has written into it
    (root / "prepared" / "metadata.jsonl").write_text("")
    purge(root, dry_run=True)
    out = capsys.readouterr().out
    assert f"  {root / 'photos'}/ (1 file)\n" in out and (root / "photos" / "me.jpg").exists()
