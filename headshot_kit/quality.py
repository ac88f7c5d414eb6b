"""Technical quality of a face, one definition per measurement.

The prepare stage judges a selfie with these numbers (is it sharp, well exposed, contrasty
enough to train on?) and the evaluate stage reports them for every headshot, so a column of
the same name means the same thing in `report.csv` and in `scores.csv`:

- `sharpness`: variance of the Laplacian over the variance of the intensities, on the face
  scaled to 128 px: blur lowers the first, while a darker or flatter photo lowers both alike,
  and a 12 MP selfie and a 512 px render are judged at the same scale;
- `brightness`: mean grey level, 0 black to 1 white;
- `highlights_clipped`: the share of pixels with a channel at 250 or more (blown out);
- `shadows_clipped`: the share of pixels with a grey level of 5 or less (crushed);
- `contrast`: (p95 - p5) / (p95 + p5) of the grey levels;
- `noise_sigma`: the noise's standard deviation in grey levels (Immerkaer 1996), at the
  crop's own resolution, since scaling smooths noise away;
- `brisque_technical`: BRISQUE (Mittal et al. 2012) with the LIVE-trained model that ships in
  the `brisque` wheel.

Grey levels are Pillow's "L" conversion (ITU-R 601-2 luma). Head pose lives with the faces
(`faces.head_pose`). None of these says whether a face looks real: generic no-reference metrics
predict human "authenticity" ratings of generated faces poorly (F-Bench / FaceQ), so they are
reported as technical quality and nothing more.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

MEASURE_SIDE = 128


def grey(image: Image.Image) -> np.ndarray:
    """Grey levels 0-255 as floats."""
    return np.asarray(image.convert("L"), dtype=np.float64)


def at_measure_side(image: Image.Image) -> Image.Image:
    """`image` scaled to MEASURE_SIDE x MEASURE_SIDE: the detail a crop will actually carry."""
    return image.resize((MEASURE_SIDE, MEASURE_SIDE), Image.Resampling.BILINEAR,
                        reducing_gap=2.0)


def sharpness(image: Image.Image) -> float:
    g = grey(at_measure_side(image))
    return float(ndimage.laplace(g).var() / max(float(g.var()), 1.0))


def brightness(image: Image.Image) -> float:
    return float(grey(image).mean() / 255)


def highlights_clipped(image: Image.Image) -> float:
    rgb = np.asarray(image.convert("RGB"))
    return float((rgb.max(axis=2) >= 250).mean())


def shadows_clipped(image: Image.Image) -> float:
    return float((grey(image) <= 5).mean())


def contrast(image: Image.Image) -> float:
    p5, p95 = np.percentile(grey(image), [5, 95])
    return float((p95 - p5) / max(p95 + p5, 1.0))


def noise_sigma(image: Image.Image) -> float:
    g = grey(image)
    if min(g.shape) < 3:
        return float("nan")
    # The mask [[1,-2,1],[-2,4,-2],[1,-2,1]] cancels image structure up to second order.
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    r = ndimage.correlate(g, mask)[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2) * np.abs(r).mean() / 6)


# ---------------------------------------------------------------------------------------------
# BRISQUE


class Brisque:
    """BRISQUE with the LIVE-trained SVM that ships in the `brisque` wheel, without OpenCV.

    The wheel's own scorer imports OpenCV for one call, a bicubic halving; `cubic_half` does
    that here (tests/test_quality.py checks it against OpenCV, installed with the dev extra),
    and scipy does the rest. The score agrees with the wheel's to within 0.05 on the samples.
    """

    def __init__(self) -> None:
        self.coef, self.support, self.gamma, self.rho, self.low, self.high = _brisque_model()

    def __call__(self, image: Image.Image) -> float:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
        grey_ = rgb @ np.array([0.2125, 0.7154, 0.0721])  # skimage's rgb2gray, as the wheel
        if min(grey_.shape) < 16:
            return float("nan")
        features = np.array(brisque_features(grey_) + brisque_features(cubic_half(grey_)))
        x = -1 + 2 * (features - self.low) / (self.high - self.low)
        kernel = np.exp(-self.gamma * ((self.support - x) ** 2).sum(axis=1))
        return float(self.coef @ kernel - self.rho)


@lru_cache(maxsize=1)
def _brisque_model() -> tuple:
    # find_spec locates the package without running its __init__, which fails without OpenCV.
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `brisque` package is not installed (pip install brisque)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    lines = (folder / "svm.txt").read_text().splitlines()
    start = lines.index("SV")
    header = dict(line.split(maxsplit=1) for line in lines[:start])
    rows = [line.split() for line in lines[start + 1:] if line.strip()]
    coef = np.array([float(r[0]) for r in rows])
    support = np.zeros((len(rows), 36))
    for i, row in enumerate(rows):
        for item in row[1:]:
            index, value = item.split(":")
            support[i, int(index) - 1] = float(value)
    # A dict of two lists of floats, written by the package's own trainer.
    scale = pickle.loads((folder / "normalize.pickle").read_bytes())
    return (coef, support, float(header["gamma"]), float(header["rho"]),
            np.array(scale["min_"], dtype=np.float64), np.array(scale["max_"], dtype=np.float64))


# The wheel's 7x7 Gaussian window (sigma 7/6), normalised.
_GAUSS7 = np.exp(-(np.arange(7) - 3.0) ** 2 / (2 * (7 / 6) ** 2))
_GAUSS7 /= _GAUSS7.sum()
# The AGGD shape parameter alpha solves phi(alpha) = R; phi rises monotonically, so a fine table
# inverted by interpolation gives the root the package finds with scipy.optimize.root.
_AGGD_ALPHA = np.arange(0.2, 10.0, 0.0005)
_AGGD_PHI = np.array([math.gamma(2 / a) ** 2 / (math.gamma(1 / a) * math.gamma(3 / a))
                      for a in _AGGD_ALPHA])


def _gauss_blur(x: np.ndarray) -> np.ndarray:
    """The wheel's scipy.signal.convolve2d(x, 7x7 Gaussian, 'same'): zero padding."""
    for axis in (0, 1):
        x = ndimage.correlate1d(x, _GAUSS7, axis=axis, mode="constant", cval=0.0)
    return x


def cubic_half(x: np.ndarray) -> np.ndarray:
    """cv2.resize(x, fx=0.5, fy=0.5, interpolation=INTER_CUBIC): output pixel i reads input
    pixels 2i-1..2i+2 with Keys' a=-0.75 weights at distance 0.5 and 1.5, edges replicated."""
    weights = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
    for axis in (0, 1):
        n = x.shape[axis]
        taps = 2 * np.arange(int(round(n / 2)))[:, None] + np.arange(-1, 3)[None, :]
        x = np.moveaxis(np.take(np.moveaxis(x, axis, -1), np.clip(taps, 0, n - 1), axis=-1)
                        @ weights, -1, axis)
    return x


def _aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalised Gaussian fit: alpha, mean, left sigma, right sigma."""
    x = x.ravel()
    left, right = x[x < 0], x[x >= 0]
    sigma_l, sigma_r = math.sqrt(np.mean(left ** 2)), math.sqrt(np.mean(right ** 2))
    r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2)
    g = sigma_l / sigma_r
    alpha = float(np.interp(r_hat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2,
                            _AGGD_PHI, _AGGD_ALPHA))
    mean = ((sigma_r - sigma_l) * math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
            * math.gamma(2 / alpha) / math.gamma(1 / alpha))
    return alpha, mean, sigma_l, sigma_r


def brisque_features(grey_: np.ndarray) -> list[float]:
    """The 18 BRISQUE features of one scale of a grey image in [0, 1]."""
    mu = _gauss_blur(grey_)
    sd = np.sqrt(np.abs(mu ** 2 - _gauss_blur(grey_ ** 2)))
    m = (grey_ - mu) / (sd + 1 / 255)
    alpha, _, sigma_l, sigma_r = _aggd_fit(m)
    features = [alpha, (sigma_l ** 2 + sigma_r ** 2) / 2]
    for pair in (m[:, :-1] * m[:, 1:], m[:-1] * m[1:], m[:-1, :-1] * m[1:, 1:],
                 m[1:, :-1] * m[:-1, 1:]):
        alpha, mean, sigma_l, sigma_r = _aggd_fit(pair)
        features += [alpha, mean, sigma_l ** 2, sigma_r ** 2]
    return features


# ---------------------------------------------------------------------------------------------
# The metrics a report lists


@dataclass(frozen=True)
class Metric:
    """One technical-quality number per image: `name` is its column, `measures` says what it
    means and which way is better."""

    name: str
    measures: str
    score: Callable[[Image.Image], float]


def quality_metrics() -> tuple[list[Metric], list[str]]:
    """The offline quality metrics that work here, and a note for each that does not."""
    metrics = [
        Metric("sharpness", "Laplacian variance over intensity variance of the face scaled "
               f"to {MEASURE_SIDE} px: higher is sharper (noise raises it too)", sharpness),
        Metric("brightness", "mean grey level of the face, 0 black to 1 white: far from 0.5 "
               "is under or over exposed", brightness),
        Metric("highlights_clipped", "share of face pixels with a channel at 250 or more "
               "(blown out): lower is better", highlights_clipped),
        Metric("shadows_clipped", "share of face pixels with a grey level of 5 or less "
               "(crushed): lower is better", shadows_clipped),
        Metric("noise_sigma", "noise standard deviation in grey levels (Immerkaer 1996), at "
               "the crop's own resolution: lower is cleaner", noise_sigma),
    ]
    notes = []
    try:
        metrics.append(Metric("brisque_technical", "BRISQUE technical distortion (Mittal et "
                              "al. 2012, trained on LIVE): lower is better, clean photo ~30, "
                              "blurred ~75; it does not say whether a face looks real",
                              Brisque()))
    except (ImportError, OSError, ValueError) as exc:
        notes.append(f"brisque_technical skipped: {exc}.")
    return metrics, notes
