"""The face-detail pass on a real photo standing in for a first render: only the padded face
box changes, the same seed gives the same image, and a photo without a face is untouched."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from headshot_kit.faces import detect_faces
from headshot_kit.facedetail import (FaceDetailConfig, detail_faces, detail_parameters,
                                     feather_mask, image_to_image, padded_box)

CFG = FaceDetailConfig(steps=4, strength=0.5)


@pytest.fixture(scope="module")
def img2img(pipe):
    return image_to_image(pipe)


@pytest.fixture(scope="module")
def render(samples) -> Image.Image:
    photo = Image.open(samples / "obama.jpg").convert("RGB")
    return photo.resize((384, round(384 * photo.height / photo.width)), Image.Resampling.LANCZOS)


def run(image, img2img, seed=0):
    return detail_faces(image, img2img, "a photo of ohwx person", seed=seed, resolution=64,
                        cfg=CFG)


def test_only_the_padded_face_box_changes(render, img2img):
    result = run(render, img2img)
    assert len(result.boxes) == 1
    left, top, right, bottom = result.boxes[0]
    face = detect_faces(render)[0]
    assert left <= face.box[0] and top <= face.box[1]
    assert right >= face.box[2] and bottom >= face.box[3]
    before, after = np.asarray(render), np.asarray(result.image)
    outside = np.ones(before.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(before[outside], after[outside])  # bit for bit
    inner = (slice(face.box[1], face.box[3]), slice(face.box[0], face.box[2]))
    assert np.abs(before[inner].astype(int) - after[inner].astype(int)).mean() > 5
    assert detail_parameters(CFG, result)["ADetailer denoising strength"] == "0.5"


def test_the_same_seed_gives_the_same_image(render, img2img):
    a, b, c = run(render, img2img, 3), run(render, img2img, 3), run(render, img2img, 4)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_a_photo_without_a_face_comes_back_untouched(samples, img2img):
    full_body = Image.open(samples / "obama3.jpg").convert("RGB")
    legs = full_body.crop((0, full_body.height * 2 // 3, full_body.width, full_body.height))
    legs = legs.resize((384, round(384 * legs.height / legs.width)))
    result = run(legs, img2img)
    assert result.image is legs and result.boxes == []
    assert "no face" in result.note
    assert detail_parameters(CFG, result) == {"Face detail": "no face found"}


def test_padded_box_stays_square_and_inside():
    assert padded_box((90, 90, 110, 110), (200, 200), 0.5) == (80, 80, 120, 120)
    assert padded_box((0, 0, 20, 30), (100, 100), 0.5) == (0, 0, 60, 60)  # shifted inward
    assert padded_box((0, 0, 90, 90), (100, 60), 0.5) == (15, 0, 75, 60)  # shrunk to fit
    mask = np.asarray(feather_mask(50, 0.2))
    assert mask[25, 25] == 255 and mask[0, 25] == 0 and mask[25, 49] == 0
