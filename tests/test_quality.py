"""The quality measures: the BRISQUE port against the libraries it stands in for, and one
scale per measurement in both stages' tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from headshot_kit import quality


@pytest.fixture(scope="module")
def grey(samples) -> np.ndarray:
    """obama.jpg as the `brisque` wheel sees it: skimage's rgb2gray, 0-1."""
    from skimage.color import rgb2gray

    return rgb2gray(np.asarray(Image.open(samples / "obama.jpg").convert("RGB")))


@pytest.mark.parametrize("shape", [(64, 64), (37, 52), (121, 90)])
def test_cubic_halving_is_opencvs(shape, grey):
    """OpenCV is a dev dependency only: the port saves users a 60 MB wheel for one resize."""
    import cv2

    for x in (np.random.default_rng(0).random(shape), grey[: shape[0] * 3, : shape[1] * 3]):
        theirs = cv2.resize(x, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        ours = quality.cubic_half(x)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def _package_features(x: np.ndarray) -> np.ndarray:
    from brisque.brisque import BRISQUE

    features = BRISQUE(url=False).calculate_brisque_features(x, kernel_size=7, sigma=7 / 6)
    # Some of its features come back as one-element arrays (it fails on them under numpy 2).
    return np.array([float(np.ravel(f)[0]) for f in features])


def test_brisque_features_and_score_are_the_brisque_packages(grey, samples):
    import cv2
    from brisque.brisque import BRISQUE

    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    theirs = np.concatenate([_package_features(grey), _package_features(half)])
    ours = np.array(quality.brisque_features(grey) + quality.brisque_features(
        quality.cubic_half(grey)))
    # alpha is read off a table (steps of 0.0005) where the package solves for it.
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=2e-5)
    score = BRISQUE(url=False).calculate_image_quality_score(theirs)
    image = Image.open(samples / "obama.jpg").convert("RGB")
    assert quality.Brisque()(image) == pytest.approx(score, abs=0.01)
    blurred = image.filter(ImageFilter.GaussianBlur(3))
    assert quality.Brisque()(blurred) > score + 20


def test_a_face_measures_the_same_in_the_report_and_in_the_scores(prepared_dataset, tmp_path):
    """report.csv (prepare, on the original photo) and scores.csv (evaluate, on the prepared
    crop) name the same measurement alike and give it the same scale."""
    from headshot_kit.config import EvaluateConfig
    from headshot_kit.evaluate import evaluate_images

    report = pd.read_csv(prepared_dataset / "report.csv").set_index("output")
    scores = evaluate_images(prepared_dataset / "images", prepared_dataset / "images",
                             tmp_path / "scores", EvaluateConfig(clip_model=""),
                             progress=False).scores.set_index("image")
    shared = {"sharpness", "brightness", "highlights_clipped"}
    assert shared <= set(report.columns) and shared <= set(scores.columns)
    for output in report.index.dropna():
        measured = scores.loc[output.removeprefix("images/")]
        assert measured["brightness"] == pytest.approx(report.loc[output, "brightness"],
                                                       abs=0.05)
        # A share, not a percentage: the samples' faces have a few blown pixels at most.
        assert measured["highlights_clipped"] == pytest.approx(
            report.loc[output, "highlights_clipped"], abs=0.02)
