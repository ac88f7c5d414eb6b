"""Framing: the square head-and-shoulders crop around a face, and levelling the eyes.

The crop is `crop_scale` x the face box when the photo allows, tighter (down to
`min_crop_scale`) rather than padded when it does not; any part outside the photo is flat grey.
The face mask goes through the same rotation and crop as the photo, so the two line up.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..config import PrepareConfig
from ..faces import Face, clip_box
from ..images import GREY


def rotate(image: Image.Image, roll: float, centre: np.ndarray) -> Image.Image:
    """`image` turned by `roll` degrees about `centre`, so that the eyes become level."""
    return image.rotate(roll, resample=Image.Resampling.BICUBIC, center=tuple(centre))


def rotate_face(face: Face, roll: float, centre: np.ndarray) -> Face:
    """The face as `rotate` moves it: landmarks turned, box turned about its centre."""
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


def plan_crop(face: Face, size: tuple[int, int],
              cfg: PrepareConfig) -> tuple[tuple[int, int, int, int], float]:
    """The square crop box in image pixels, and its side as a multiple of the face."""
    w, h = size
    face_side = max(face.width, face.height)
    # Head and shoulders when the photo allows; tighter (down to min_crop_scale) rather than
    # padding when it does not: a selfie held close has little around the face.
    side = round(max(min(cfg.crop_scale * face_side, w, h), cfg.min_crop_scale * face_side))
    cx, cy = face.center
    cy += cfg.crop_shift_down * face.height
    fl, ft, fr, fb = clip_box(face.box, size)
    x0 = _place(cx, side, fl, fr, w)
    y0 = _place(cy, side, ft, fb, h)
    return (x0, y0, x0 + side, y0 + side), side / face_side


def render_crop(image: Image.Image, valid: Image.Image, box: tuple[int, int, int, int],
                padding: float, resolution: int, fill: tuple[int, ...] | int = GREY
                ) -> Image.Image:
    """The crop at `resolution`, with any part outside the photo `fill` (flat grey; a face
    mask passes 0: padding is not face)."""
    size = (resolution, resolution)
    if padding == 0:
        crop = image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    else:
        canvas = Image.new(image.mode, (box[2] - box[0], box[3] - box[1]), fill)
        canvas.paste(image.crop(box), mask=valid.crop(box))
        crop = canvas.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    crop.info = {}
    return crop
