"""Checking the photos: each one on its own, then the set as a whole.

One photo: is there a face, is it large enough, sharp, well exposed and contrasty, turned
towards the camera, with the eyes visible, and does a head-and-shoulders crop fit the photo?
The set: is any photo a near-duplicate of another, and does any show someone else? Each check
gives a verdict (pass, warn or fail) with the sentence the report shows; the measurements are
headshot_kit.quality's, so they mean what the evaluate stage's columns of the same name mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import quality
from ..config import PrepareConfig
from ..faces import (DLIB_SAME_PERSON_DISTANCE, Face, FaceModelsMissing, clip_box,
                     describe_face, eyes_and_nose, face_distance, face_mask, find_faces,
                     face_with_margin, head_pose)
from .crop import plan_crop, render_crop, rotate, rotate_face
from .intake import Input, Unusable, load

# Thumbnails for the contact sheet and the near-duplicate hash.
THUMB_SIDE = 240


@dataclass
class Check:
    """One check's verdict on one photo."""

    verdict: str  # "pass", "warn" or "fail"
    sentence: str  # what a person reads in the report
    label: str = ""  # two or three words for the advice and the contact sheet badges


@dataclass
class Photo:
    """Everything learned about one input file on its way through the checks."""

    file: str
    order: int
    checks: dict[str, Check] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    crop: Image.Image | None = None
    mask: Image.Image | None = None  # the face and hair in the crop ('L'), pixel for pixel
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


def examine_safely(item: Input, order: int, cfg: PrepareConfig) -> Photo:
    photo = Photo(file=item.file, order=order)
    if item.refused:
        photo.checks["read"] = Check("fail", item.refused, item.label)
        return photo
    try:
        _examine(photo, item.path, cfg)
    except Unusable as exc:
        photo.checks = {"read": Check("fail", str(exc), exc.label)}
    except FaceModelsMissing:
        raise  # an install problem, not a bad photo: every photo would fail the same way
    except Exception as exc:  # one odd file must not stop the batch; the row says what happened
        what = f"{type(exc).__name__}: {exc}"
        photo.checks = {"read": Check("fail", f"Unexpected error while preparing it ({what}); "
                                              "please report it.", "error")}
    return photo


def _examine(photo: Photo, path: Path, cfg: PrepareConfig) -> None:
    loaded = load(path, cfg)
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
    photo.descriptor = describe_face(*face_with_margin(image, face))

    measures = _measure(image, face)
    photo.yaw = measures["yaw_deg"]
    photo.values.update({k: round(v, 3) for k, v in measures.items()})
    for name, check in _quality_checks(measures, cfg).items():
        photo.checks[name] = check

    # Which crop pixels come from the photo: padding is measured, not guessed.
    valid = Image.new("L", image.size, 255)
    # Outlined on the photo as found, then turned and cropped with it: the train stage reads
    # it as lining up with the crop pixel for pixel.
    mask = face_mask(image, face)
    roll = measures["roll_deg"]
    if cfg.align_roll and abs(roll) >= 0.5:
        centre = sum(eyes_and_nose(face.landmarks)[:2]) / 2
        image, valid = rotate(image, roll, centre), rotate(valid, roll, centre)
        mask = rotate(mask, roll, centre)
        face = rotate_face(face, roll, centre)
        photo.notes.append(f"rotated {roll:.1f} degrees to level the eyes.")
    box, framing = plan_crop(face, image.size, cfg)
    padding = max(0.0, 1 - float(np.asarray(valid.crop(box), dtype=np.float32).mean()) / 255)
    upscale = cfg.resolution / (box[2] - box[0])
    photo.values.update(upscale=round(upscale, 2), framing_scale=round(framing, 2),
                        padding_pct=round(100 * padding, 1))
    photo.checks["face_size"] = _size_check(upscale, photo.values["face_px"], cfg)
    photo.checks["framing"] = _framing_check(face, image.size, padding, framing, cfg)
    photo.crop = render_crop(image, valid, box, padding, cfg.resolution)
    photo.mask = render_crop(mask, valid, box, padding, cfg.resolution, fill=0)
    _set_thumb(photo, image, face.box, box)


def _find_faces(image: Image.Image, cfg: PrepareConfig) -> list[Face]:
    # Selfie faces are large, so the plain pass finds them at a quarter of the cost of the
    # upsampled one, which runs only when the plain pass finds nothing (small, distant faces);
    # YuNet after both (faces.find_faces).
    return find_faces(image, upsample=cfg.detect_upsample, max_side=cfg.detect_max_side)


def _face_check(found: list[Face], width: int) -> tuple[Check, str]:
    if len(found) == 1:
        return Check("pass", "One face found."), "the only face"
    x = found[0].center[0] / width
    where = "on the left" if x < 0.4 else "on the right" if x > 0.6 else "in the middle"
    return (Check("warn", f"{len(found)} faces found: used the largest ({where}); make sure it "
                          "is yours, or crop the others out.", "several faces"),
            f"largest of {len(found)} ({where})")


def _measure(image: Image.Image, face: Face) -> dict[str, float]:
    """Sharpness, exposure, contrast, pose and eye visibility of the chosen face, each as
    headshot_kit.quality (or faces.head_pose) defines it, on the face box at 128 px."""
    region = quality.at_measure_side(image.crop(clip_box(face.box, image.size)))
    yaw, roll = head_pose(face.landmarks)
    return {"sharpness": quality.sharpness(region), "brightness": quality.brightness(region),
            "highlights_clipped": quality.highlights_clipped(region),
            "contrast": quality.contrast(region), "yaw_deg": yaw, "roll_deg": roll,
            "eye_ratio": _eye_ratio(image, face.landmarks)}


def _eye_ratio(image: Image.Image, landmarks: np.ndarray) -> float:
    """Brightness of the eye regions over that of the cheeks and nose: sunglasses are dark."""
    right, left, nose = eyes_and_nose(landmarks)
    d = float(np.hypot(*(right - left)))
    eyes = [quality.grey(image.crop(clip_box((c[0] - d / 4, c[1] - d / 8, c[0] + d / 4,
                                              c[1] + d / 8), image.size))).mean()
            for c in (right, left)]
    mid = (right + left) / 2
    cheeks = quality.grey(image.crop(clip_box((mid[0] - 0.8 * d, nose[1] - 0.1 * d,
                                              mid[0] + 0.8 * d, nose[1] + 0.3 * d),
                                              image.size))).mean()
    return float(np.mean(eyes) / max(float(cheeks), 1.0))


def _quality_checks(m: dict[str, float], cfg: PrepareConfig) -> dict[str, Check]:
    checks = {}
    s = m["sharpness"]
    if s < cfg.sharpness_fail:
        checks["focus"] = Check("fail", f"The face is blurry (sharpness {s:.3f}, needs "
                                        f"{cfg.sharpness_warn}): use a photo in focus, without "
                                        "motion blur.", "blurry")
    elif s < cfg.sharpness_warn:
        checks["focus"] = Check("warn", f"The face is a little soft (sharpness {s:.3f}): a "
                                        "sharper photo teaches finer detail.", "soft")
    else:
        checks["focus"] = Check("pass", f"Sharp (sharpness {s:.3f}).")
    b, clipped = m["brightness"], m["highlights_clipped"]
    if b < cfg.dark_fail:
        checks["exposure"] = Check("fail", f"The face is far too dark (brightness {b:.2f}, 0 "
                                           "black to 1 white): use a photo taken in better "
                                           "light.", "too dark")
    elif clipped > cfg.clipped_fail:
        checks["exposure"] = Check("fail", f"The face is blown out: {clipped:.0%} of it is pure"
                                           " white. Use a photo without flash or sun glare on "
                                           "the face.", "blown out")
    elif b < cfg.dark_warn:
        checks["exposure"] = Check("warn", f"The face is dark (brightness {b:.2f}); a "
                                           "brighter photo shows more detail.", "dark")
    elif clipped > cfg.clipped_warn:
        checks["exposure"] = Check("warn", f"{clipped:.0%} of the face is pure white (glare "
                                           "or overexposure).", "bright spots")
    else:
        checks["exposure"] = Check("pass", f"Well exposed (brightness {b:.2f}).")
    c = m["contrast"]
    checks["haze"] = (
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
    inside = clip_box(face.box, size)
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


def _set_thumb(photo: Photo, image: Image.Image, face_box: tuple[int, ...] | None,
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


def _own_rank(photo: Photo) -> tuple:
    """Which of several near-duplicates to keep: fewest failures, fewest warnings, largest
    face, the camera's original over a re-export, then the one listed first."""
    return (len(photo.verdicts("fail")), len(photo.verdicts("warn")),
            -photo.values.get("face_px", 0), not photo.camera, photo.order)


def check_duplicates(photos: list[Photo], cfg: PrepareConfig) -> None:
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
    groups: dict[int, list[Photo]] = {}
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


def check_identity(photos: list[Photo], cfg: PrepareConfig) -> None:
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
    close = dist < DLIB_SAME_PERSON_DISTANCE
    # The anchor is the photo with the most same-person neighbours; ties go to the one
    # closest to all others. Its neighbours are "you".
    anchor = min(range(len(voters)), key=lambda i: (-close[i].sum(), dist[i].sum()))
    centroid = vectors[close[anchor]].mean(axis=0)
    for p in faced:
        d = face_distance(p.descriptor, centroid)
        p.values["identity_distance"] = round(d, 3)
        if d >= DLIB_SAME_PERSON_DISTANCE:
            p.checks["identity"] = Check(
                "fail", f"Looks like a different person from most photos (face distance {d:.2f};"
                        f" the same person is below {DLIB_SAME_PERSON_DISTANCE}).",
                "different person")
        elif d >= cfg.identity_warn:
            p.checks["identity"] = Check("warn", f"Looks less like the other photos (face "
                                                 f"distance {d:.2f}): make sure it is you.",
                                         "weak likeness")
        else:
            p.checks["identity"] = Check("pass", f"Same person as the others (distance "
                                                 f"{d:.2f}).")
