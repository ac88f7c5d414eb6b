"""A second pass over each face of a rendered headshot, at the model's full resolution.

In a 512 px head-and-shoulders shot the face is about 150 px: too few pixels for the model to
draw eyes and the features that carry identity. The pass finds each face (with YuNet, see
DETECTOR_NAME), crops it with a margin, scales the crop up to the model's resolution,
re-renders it image-to-image with the same prompt, seed and LoRA at a moderate strength, scales
it back and pastes it under a feathered mask. It is what ADetailer does for A1111
(github.com/Bing-su/adetailer) and what FaceChain and EasyPhoto do after their first render.

Only pixels inside the padded face box can change; an image without a face comes back as it
was, with a note saying so. Its two settings (strength and padding) are GenerateConfig's
`face_detail_*` fields and travel with each image's Shot; the values below are fixed.
"""

from __future__ import annotations

import weakref
from dataclasses import KW_ONLY, dataclass, field
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from .faces import YUNET_NAME, detect_faces_yunet

# The faces are found by OpenCV zoo's YuNet: generated faces are often small, and on real
# photos at 128 px (faces of 20-30 px) YuNet finds every face where dlib's HOG misses a third
# (bench/faces.py). Its box takes in the forehead, which the pass redraws too.
DETECTOR_NAME = YUNET_NAME
# Width of the blend at the crop's edge as a fraction of the crop side: no visible seam.
FEATHER = 0.12
# Faces smaller than this (px) are left alone: too small to matter in the final picture.
MIN_FACE = 24
# At most this many faces per image, largest first (a headshot has one).
MAX_FACES = 4

# The PNG "parameters" keys. ADetailer's, as ADetailer 25 writes and reads them
# (adetailer/args.py in Bing-su/adetailer; "mask only top k" and "method to decide top k masks"
# since 24.11), with the values that reproduce the pass in A1111/Forge: its face detector, its
# defaults where our pass has no setting in its units (its inpaint padding and mask blur are
# pixels, ours fractions of the face and of the crop), our strength and face count. Ours, under
# keys of their own, hold what renders the image again exactly here: the detector that found
# the faces, the padding and feather, and what the pass did.
STRENGTH_KEY = "ADetailer denoising strength"
# The ADetailer detector a user would pick for a face pass (ADetailer's default model).
ADETAILER_MODEL = "face_yolov8n.pt"
# The ADetailer release whose infotext keys these are.
ADETAILER_VERSION = "25.3.0"
ADETAILER_DEFAULTS = {"ADetailer confidence": "0.3", "ADetailer dilate erode": "4",
                      "ADetailer mask blur": "4", "ADetailer inpaint only masked": "True",
                      "ADetailer inpaint padding": "32"}
DETECTOR_KEY = "Face detail detector"
PADDING_KEY = "Face detail padding"
FEATHER_KEY = "Face detail feather"
NOTE_KEY = "Face detail"


@dataclass
class FaceDetailResult:
    image: Image.Image
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # padded crops
    # What the pass did, for the manifest: "" when it did not run.
    note: str = ""


def padded_box(box: tuple[int, int, int, int], size: tuple[int, int],
               padding: float) -> tuple[int, int, int, int]:
    """A square around `box` grown by `padding` x its side on every side, kept inside the
    image (shifted, then shrunk, at the border)."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top)
    side = min(int(round(side * (1 + 2 * padding))), *size)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0 = int(round(min(max(cx - side / 2, 0), size[0] - side)))
    y0 = int(round(min(max(cy - side / 2, 0), size[1] - side)))
    return x0, y0, x0 + side, y0 + side


def feather_mask(side: int, feather: float) -> Image.Image:
    """An L-mode square mask: 255 in the middle, falling to 0 at the edge over `feather`."""
    width = max(1, int(round(side * feather)))
    ramp = np.clip(np.minimum(np.arange(side), np.arange(side)[::-1]) / width, 0.0, 1.0)
    mask = np.minimum.outer(ramp, ramp)
    return Image.fromarray(np.round(mask * 255).astype(np.uint8), mode="L")


# One image-to-image pipeline per text-to-image pipeline: building it is cheap, but a notebook
# renders hundreds of images with the same pipeline.
_IMG2IMG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def image_to_image(pipe):
    """The image-to-image pipeline over the same components (weights, LoRA), made once per
    pipeline. Set its scheduler before each use: `pipe`'s is replaced per render, its is not."""
    if pipe not in _IMG2IMG:
        from diffusers import AutoPipelineForImage2Image

        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        img2img.set_progress_bar_config(disable=True)
        _IMG2IMG[pipe] = img2img
    return _IMG2IMG[pipe]


def pass_steps(steps: int, strength: float) -> int:
    """The sampling steps to ask img2img for: `steps`, or more where strength x steps would
    round down to no step at all (A1111 runs at least one; diffusers would raise)."""
    total = steps
    while int(total * strength) < 1:
        total += 1
    return total


@dataclass(frozen=True)
class FacePass:
    """How the pass redraws each face: the shot's prompt, seed and sampling, at the model's
    resolution, at denoising `strength`, each crop grown by `padding` x the face's side on
    every side (GenerateConfig's `face_detail_*`)."""

    prompt: str
    _: KW_ONLY
    seed: int
    resolution: int
    steps: int
    strength: float
    padding: float
    negative_prompt: str = ""
    guidance: float = 7.0


def detail_faces(image: Image.Image, img2img, spec: FacePass, *,
                 extra: dict | None = None) -> FaceDetailResult:
    """Re-render every face of `image` as `spec` says (see the module docstring); `extra` goes
    to the pipeline as it is (e.g. SDXL's micro-conditioning)."""
    faces = [f for f in detect_faces_yunet(image)
             if min(f.width, f.height) >= MIN_FACE][:MAX_FACES]
    if not faces:
        return FaceDetailResult(image, note="no face found: image as rendered")
    out = image.convert("RGB").copy()
    boxes = []
    for i, face in enumerate(faces):
        box = padded_box(face.box, out.size, spec.padding)
        side = box[2] - box[0]
        crop = out.crop(box).resize((spec.resolution, spec.resolution),
                                    Image.Resampling.LANCZOS)
        redrawn = img2img(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
                          image=crop, strength=spec.strength,
                          num_inference_steps=pass_steps(spec.steps, spec.strength),
                          guidance_scale=spec.guidance,
                          generator=torch.Generator().manual_seed(spec.seed + i),
                          **(extra or {})).images[0]
        redrawn = redrawn.resize((side, side), Image.Resampling.LANCZOS)
        out.paste(redrawn, box[:2], feather_mask(side, FEATHER))
        boxes.append(box)
    return FaceDetailResult(out, boxes, note=f"{len(boxes)} face{'s' * (len(boxes) > 1)} "
                                             "redrawn")


def detail_parameters(strength: float, padding: float, note: str) -> dict[str, str]:
    """The pass's settings and note for the PNG "parameters" chunk; none when it is off (as
    ADetailer writes no keys then)."""
    if not strength:
        return {}
    return {"ADetailer model": ADETAILER_MODEL, **ADETAILER_DEFAULTS,
            "ADetailer method to decide top k masks": "Area",
            "ADetailer mask only top k": str(MAX_FACES), STRENGTH_KEY: f"{strength:g}",
            "ADetailer version": ADETAILER_VERSION, DETECTOR_KEY: DETECTOR_NAME,
            PADDING_KEY: f"{padding:g}", FEATHER_KEY: f"{FEATHER:g}", NOTE_KEY: note}


def read_detail_parameters(params: Mapping[str, str],
                           default_padding: float) -> tuple[float, float, str]:
    """(strength, padding, note) from the parsed "parameters" keys: (0, 0, "") without the
    pass. A1111's own ADetailer names no padding of ours: `default_padding` stands in."""
    strength = float(params.get(STRENGTH_KEY, 0.0))
    padding = float(params.get(PADDING_KEY, default_padding)) if strength else 0.0
    return strength, padding, params.get(NOTE_KEY, "") if strength else ""
