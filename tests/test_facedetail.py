"""The face-detail pass on a real photo standing in for a first render: only the padded face
box changes, the same seed gives the same image, and a photo without a face is untouched.

The tiny model draws no faces, so the generate and widget tests use the helpers below to make a
real photo the first render of every shot, and run the pass on that."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from headshot_kit.faces import detect_faces
from headshot_kit.facedetail import (NOTE_KEY, FacePass, detail_faces, detail_parameters,
                                     feather_mask, image_to_image, padded_box, pass_steps,
                                     read_detail_parameters)

STRENGTH, PADDING = 0.5, 0.35


@pytest.fixture(scope="module")
def img2img(pipe):
    return image_to_image(pipe)


def sample_render(samples) -> Image.Image:
    """A real photo, at about the size of a render, whose face dlib finds."""
    photo = Image.open(samples / "obama.jpg").convert("RGB")
    return photo.resize((384, round(384 * photo.height / photo.width)), Image.Resampling.LANCZOS)


def photo_as_first_render(monkeypatch, photo: Image.Image) -> None:
    """Make the generate stage's first render (not the face pass) return `photo`."""
    from headshot_kit.generate import shots

    monkeypatch.setattr(shots, "first_render", lambda batch, pipe: [photo.copy() for _ in batch])


@pytest.fixture(scope="module")
def render(samples) -> Image.Image:
    return sample_render(samples)


def run(image, img2img, seed=0):
    return detail_faces(image, img2img, FacePass("a photo of ohwx person", seed=seed,
                                                 resolution=64, steps=4, strength=STRENGTH,
                                                 padding=PADDING))


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
    assert result.note == "1 face redrawn"
    params = detail_parameters(STRENGTH, PADDING, result.note)
    assert params["ADetailer denoising strength"] == "0.5"
    assert read_detail_parameters(params, 0.0) == (STRENGTH, PADDING, "1 face redrawn")


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
    assert result.note == "no face found: image as rendered"
    assert detail_parameters(STRENGTH, PADDING, result.note)[NOTE_KEY] == result.note
    # Switched off, the pass leaves no keys, and none read back as off.
    assert detail_parameters(0.0, PADDING, "") == {}
    assert read_detail_parameters({}, PADDING) == (0.0, 0.0, "")


def test_a_low_strength_still_runs_one_step():
    # diffusers' img2img runs int(steps x strength) steps and refuses 0; A1111 runs one.
    assert pass_steps(30, 0.4) == 30 and pass_steps(2, 0.4) == 3 and pass_steps(1, 0.05) == 20


def test_padded_box_stays_square_and_inside():
    assert padded_box((90, 90, 110, 110), (200, 200), 0.5) == (80, 80, 120, 120)
    assert padded_box((0, 0, 20, 30), (100, 100), 0.5) == (0, 0, 60, 60)  # shifted inward
    assert padded_box((0, 0, 90, 90), (100, 60), 0.5) == (15, 0, 75, 60)  # shrunk to fit
    mask = np.asarray(feather_mask(50, 0.2))
    assert mask[25, 25] == 255 and mask[0, 25] == 0 and mask[25, 49] == 0
