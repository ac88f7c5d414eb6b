"""A second pass over each face of a rendered headshot, at the model's full resolution.

In a 512 px head-and-shoulders shot the face is about 150 px: too few pixels for the model to
draw eyes and the features that carry identity. The pass finds each face (with the evaluate
stage's detector), crops it with a margin, scales the crop up to the model's resolution,
re-renders it image-to-image with the same prompt, seed and LoRA at a moderate strength, scales
it back and pastes it under a feathered mask. It is what ADetailer does for A1111
(github.com/Bing-su/adetailer) and what FaceChain and EasyPhoto do after their first render.

Only pixels inside the padded face box can change; an image without a face comes back as it
was, with a note saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .faces import detect_faces

DETECTOR_NAME = "dlib-hog"


@dataclass
class FaceDetailConfig:
    # Denoising strength of the face re-render: ADetailer's default 0.4 keeps the face's pose
    # and lighting and redraws its detail; from about 0.6 it drifts from the first render.
    strength: float = 0.4
    # Margin around dlib's face box (eyebrows to chin) as a fraction of its side, on each side,
    # so forehead, hair line and chin are redrawn with the face.
    padding: float = 0.35
    # Width of the blend at the crop's edge as a fraction of the crop side: no visible seam.
    feather: float = 0.12
    # Faces smaller than this (px) are left alone: too small to matter in the final picture.
    min_face: int = 24
    # At most this many faces per image, largest first (a headshot has one).
    max_faces: int = 4
    # Upsampling passes of the detector: generated faces are smaller than selfie faces.
    detect_upsample: int = 1
    # Sampling steps of the face pass; img2img runs strength x steps of them.
    steps: int = 30


@dataclass
class FaceDetailResult:
    image: Image.Image
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # padded crops
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


def image_to_image(pipe):
    """The image-to-image pipeline over the same components (weights, LoRA, scheduler)."""
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def detail_faces(image: Image.Image, img2img, prompt: str, *, seed: int, resolution: int,
                 cfg: FaceDetailConfig | None = None, negative_prompt: str = "",
                 guidance: float = 7.0, extra: dict | None = None) -> FaceDetailResult:
    """Re-render every face of `image` (see the module docstring); `extra` goes to the
    pipeline as it is (e.g. SDXL's micro-conditioning)."""
    cfg = cfg or FaceDetailConfig()
    faces = [f for f in detect_faces(image, upsample=cfg.detect_upsample)
             if min(f.width, f.height) >= cfg.min_face][: cfg.max_faces]
    if not faces:
        return FaceDetailResult(image, note="face detail: no face found, image as rendered")
    out = image.convert("RGB").copy()
    boxes = []
    for i, face in enumerate(faces):
        box = padded_box(face.box, out.size, cfg.padding)
        side = box[2] - box[0]
        crop = out.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)
        redrawn = img2img(prompt=prompt, negative_prompt=negative_prompt or None, image=crop,
                          strength=cfg.strength, num_inference_steps=cfg.steps,
                          guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed + i),
                          **(extra or {})).images[0]
        redrawn = redrawn.resize((side, side), Image.Resampling.LANCZOS)
        out.paste(redrawn, box[:2], feather_mask(side, cfg.feather))
        boxes.append(box)
    return FaceDetailResult(out, boxes, note=f"face detail: {len(boxes)} face(s) redrawn")


def detail_parameters(cfg: FaceDetailConfig, result: FaceDetailResult) -> dict[str, str]:
    """The pass's settings for the PNG `parameters` chunk: A1111 ADetailer's key names where
    they mean the same (its padding and blur are pixels, ours fractions of the crop)."""
    if not result.boxes:
        return {"Face detail": "no face found"}
    return {"ADetailer model": DETECTOR_NAME,
            "ADetailer denoising strength": f"{cfg.strength:g}",
            "ADetailer steps": str(cfg.steps),
            "Face detail padding": f"{cfg.padding:g}",
            "Face detail feather": f"{cfg.feather:g}",
            "Face detail faces": str(len(result.boxes))}
