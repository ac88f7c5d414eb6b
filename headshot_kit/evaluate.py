"""Evaluate: do the generated headshots look like you, and are they any good?

Reads a folder of reference photos of the person and the generate stage's output folder (its
`manifest.csv`, or any plain folder of images) and writes, into its own folder:

- `scores.csv`: one row per generated image: is there a face, how much it looks like the
  references (likeness 0-1, the embedder's same-person threshold at 0.5) and like the run's
  other faces (consistency), technical quality of the face, and the manifest's columns (style,
  seed, prompt, ...). An image without a face is a failure row, never skipped, so it counts
  against the "look like you" rate.
- `summary.csv`: overall and per style: how many look like you, likeness, how consistent the
  faces are with each other, how diverse they are, and mean quality.
- plots (`likeness_by_style.png`, `likeness_vs_quality.png`, `consistency.png`), an annotated
  `contact_sheet.png` ranked best first, and the resolved `config.json`.

Identity is scored with a face network that the generator did not train against (PuLID's
advice): dlib's 128-d ResNet descriptor by default, which works offline; ArcFace and FaceNet
when their weights can be downloaded (Colab). Every score names its embedder.

Quality numbers are technical quality (sharpness, exposure, noise, BRISQUE): generic no-reference
metrics predict human "does this face look real" ratings poorly (F-Bench / FaceQ), so none of
them is called realism. A CLIP zero-shot "photograph vs digital art / 3D render / painting"
probability and CLIP-T prompt adherence (DreamBench) are added when CLIP weights can be loaded.

`validate_metric` checks on real photos that same-person pairs and different-person pairs fall
on the right sides of the threshold; `record_experiment` and `compare` keep one row per run in
an experiments table and plot any metric against any setting, with confidence intervals over
seeds and images (headshot_kit.stats) where they exist.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.util
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from . import faces
from .config import ConfigError, EvaluateConfig, save_config, to_dict
from .images import contact_sheet, list_images, load_image
from .models import hub_reachable, pick_device
from .stats import METRICS as INTERVAL_METRICS
from .stats import seed_intervals
from .storage import atomic_path, atomic_write_text
from .workspace import SCORES

PathLike = str | Path


class EmbedderUnavailable(RuntimeError):
    """A face embedder's package or weights are missing; the message says what to do."""


class NoFaceError(ValueError):
    """A photo that must show a face (a reference, a validation photo) shows none."""


# ---------------------------------------------------------------------------------------------
# Face embedders: one small interface, three networks.
# ---------------------------------------------------------------------------------------------


class FaceEmbedder:
    """Finds faces and turns each into an identity vector.

    Subclasses set `name` (written next to every score), `threshold` (the distance below which
    two faces are the same person), `licence`, and implement `embed`.
    """

    name: str = ""
    threshold: float = 0.0
    licence: str = ""

    def __init__(self, cfg: EvaluateConfig) -> None:
        # The reference cache is keyed on this, so a change of detection settings re-describes.
        self.key = f"{self.name}/up{cfg.detect_upsample}/max{cfg.detect_max_side}"

    def embed(self, image: Image.Image) -> list[tuple[faces.Face, np.ndarray]]:
        """Every face in `image`, largest first, each with its identity vector."""
        raise NotImplementedError

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Euclidean distance between every row of `a` (n x d) and of `b` (m x d): n x m."""
        return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)

    def to_similarity(self, distance: float | np.ndarray) -> np.ndarray:
        """0-1 likeness with this embedder's threshold at 0.5 (faces.py's mapping, generalised)."""
        return np.clip(1.0 - np.asarray(distance) / (2 * self.threshold), 0.0, 1.0)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Likeness between every vector of `a` and every vector of `b`."""
        return self.to_similarity(self.distances(np.atleast_2d(a), np.atleast_2d(b)))


class DlibEmbedder(FaceEmbedder):
    """dlib's HOG detector + 128-d ResNet descriptor (99.38% on LFW); runs offline on a CPU."""

    name = faces.EMBEDDER_NAME
    threshold = faces.DLIB_SAME_PERSON_DISTANCE
    licence = "dlib: Boost Software License; model files: CC0 (face-recognition-models)"

    def __init__(self, cfg: EvaluateConfig) -> None:
        super().__init__(cfg)
        self.upsample, self.max_side = cfg.detect_upsample, cfg.detect_max_side

    def embed(self, image: Image.Image) -> list[tuple[faces.Face, np.ndarray]]:
        # A headshot's face is large enough to find without upsampling, which costs 4x the
        # time; upsampling is only tried when nothing was found. The box moves a few pixels,
        # the descriptor (aligned on landmarks) by about 0.04, far below the 0.6 threshold.
        for upsample in sorted({0, self.upsample}):
            found = faces.detect_faces(image, upsample=upsample, max_side=self.max_side)
            if found:
                break
        return [(face, faces.describe_face(image, face)) for face in found]

    def to_similarity(self, distance: float | np.ndarray) -> np.ndarray:
        return faces.distance_to_similarity(distance)


class _CosineEmbedder(FaceEmbedder):
    """Networks trained with angular losses compare by cosine distance (1 - cos)."""

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return 1.0 - a @ b.T


def _eyes_and_nose_as_dlib(points: np.ndarray) -> np.ndarray:
    """Five (left eye, right eye, nose, mouth, mouth) points laid out like dlib's five.

    dlib's order is two corners of one eye, two of the other, then the nose; the pose measure
    only uses eye centres and the nose, so each eye centre stands in for both corners.
    """
    points = np.asarray(points, dtype=np.float64)
    return np.stack([points[0], points[0], points[1], points[1], points[2]])


class ArcFaceEmbedder(_CosineEmbedder):
    """insightface's buffalo_l (SCRFD detector + ArcFace R50); weights download on first use."""

    name = "arcface-buffalo_l"
    # DeepFace's LFW-tuned cosine-distance threshold for ArcFace (deepface verification.py);
    # a starting point for buffalo_l: check it with validate_metric on your own photos.
    threshold = 0.68
    licence = "insightface model zoo: non-commercial research use only"

    def __init__(self, cfg: EvaluateConfig) -> None:
        super().__init__(cfg)
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise EmbedderUnavailable(
                "embedder='arcface' needs insightface: run `pip install insightface "
                "onnxruntime` (its buffalo_l weights are download-only and licensed for "
                "non-commercial research), or use embedder='dlib' offline.") from exc
        gpu = pick_device(cfg.device) == "cuda"
        try:
            self.app = FaceAnalysis(
                name="buffalo_l", allowed_modules=["detection", "recognition"],
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu
                else ["CPUExecutionProvider"])
            self.app.prepare(ctx_id=0 if gpu else -1, det_size=(640, 640))
        except Exception as exc:  # insightface raises assorted errors for a failed download
            raise EmbedderUnavailable(
                f"ArcFace weights (buffalo_l) could not be loaded ({exc}). They are downloaded "
                "to ~/.insightface on first use, which needs the network (e.g. Colab); offline, "
                "use embedder='dlib'.") from exc

    def embed(self, image: Image.Image) -> list[tuple[faces.Face, np.ndarray]]:
        bgr = np.ascontiguousarray(faces.to_rgb_array(image)[:, :, ::-1])
        found = [(faces.Face(box=tuple(int(round(v)) for v in f.bbox), score=float(f.det_score),
                             landmarks=_eyes_and_nose_as_dlib(f.kps)), np.asarray(f.embedding))
                 for f in self.app.get(bgr)]
        return sorted(found, key=lambda item: item[0].area, reverse=True)


class FaceNetEmbedder(_CosineEmbedder):
    """facenet-pytorch: MTCNN (weights in the wheel) + InceptionResnetV1 trained on VGGFace2."""

    name = "facenet-vggface2-512"
    # DeepFace's cosine-distance threshold for Facenet512, the same VGGFace2 weights.
    threshold = 0.30
    licence = "facenet-pytorch: MIT; VGGFace2 weights: research use (check before shipping)"

    def __init__(self, cfg: EvaluateConfig) -> None:
        super().__init__(cfg)
        try:
            from facenet_pytorch import MTCNN, InceptionResnetV1
        except ImportError as exc:
            raise EmbedderUnavailable(
                "embedder='facenet' needs facenet-pytorch: run `pip install facenet-pytorch` "
                "(its recognition weights are download-only), or use embedder='dlib' "
                "offline.") from exc
        self.device = pick_device(cfg.device)
        # 160 px crops with a small margin: how the VGGFace2 model was trained.
        self.mtcnn = MTCNN(image_size=160, margin=14, keep_all=True, device=self.device)
        try:
            self.model = InceptionResnetV1(pretrained="vggface2").eval().to(self.device)
        except Exception as exc:  # a failed download surfaces as URL, OS or HTTP errors
            raise EmbedderUnavailable(
                f"FaceNet weights (vggface2) could not be downloaded ({exc}). They need the "
                "network on first use (e.g. Colab); offline, use embedder='dlib'.") from exc

    def embed(self, image: Image.Image) -> list[tuple[faces.Face, np.ndarray]]:
        import torch

        boxes, probs, points = self.mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return []
        crops = self.mtcnn.extract(image, boxes, None).to(self.device)
        with torch.no_grad():
            vectors = self.model(crops).cpu().numpy()
        found = [(faces.Face(box=tuple(int(round(v)) for v in box), score=float(prob),
                             landmarks=_eyes_and_nose_as_dlib(pts)), vec)
                 for box, prob, pts, vec in zip(boxes, probs, points, vectors)]
        return sorted(found, key=lambda item: item[0].area, reverse=True)


EMBEDDERS: dict[str, type[FaceEmbedder]] = {
    "dlib": DlibEmbedder,
    "arcface": ArcFaceEmbedder,
    "facenet": FaceNetEmbedder,
}
_LOADED_EMBEDDERS: dict[tuple, FaceEmbedder] = {}


def get_embedder(cfg: EvaluateConfig | None = None) -> FaceEmbedder:
    """The embedder `cfg.embedder` names, loaded once per session (ArcFace takes seconds)."""
    cfg = cfg or EvaluateConfig()
    if cfg.embedder not in EMBEDDERS:
        raise ConfigError(f"embedder is {cfg.embedder!r}; choose one of {', '.join(EMBEDDERS)}.")
    key = (cfg.embedder, cfg.detect_upsample, cfg.detect_max_side, cfg.device)
    if key not in _LOADED_EMBEDDERS:
        _LOADED_EMBEDDERS[key] = EMBEDDERS[cfg.embedder](cfg)
    return _LOADED_EMBEDDERS[key]


# Reference photos are described once per session, keyed on their bytes: re-evaluating another
# run against the same photos (the usual notebook loop) costs nothing for the references.
_REFERENCE_CACHE: dict[tuple[str, str], list[tuple[faces.Face, np.ndarray]]] = {}


def _embed_photo(embedder: FaceEmbedder, path: Path) -> list[tuple[faces.Face, np.ndarray]]:
    key = (embedder.key, hashlib.sha256(path.read_bytes()).hexdigest())
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = embedder.embed(load_image(path))
    return _REFERENCE_CACHE[key]


# ---------------------------------------------------------------------------------------------
# Technical quality: one small interface, computed on the face crop.
# ---------------------------------------------------------------------------------------------


class QualityMetric:
    """One technical-quality number per image. `name` is its column in scores.csv and
    `measures` says what it means and which way is better."""

    name: str = ""
    measures: str = ""

    def score(self, image: Image.Image) -> float:
        raise NotImplementedError


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


class Sharpness(QualityMetric):
    name = "sharpness_laplacian"
    measures = ("variance of the Laplacian of the grey face crop scaled to 128 px: higher is "
                "sharper (noise raises it too); scaling makes small and large faces comparable")
    side = 128

    def score(self, image: Image.Image) -> float:
        g = _grey(image.resize((self.side, self.side), Image.Resampling.BILINEAR))
        laplacian = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
        return float(laplacian.var())


class Exposure(QualityMetric):
    name = "exposure_mean"
    measures = "mean brightness of the face crop, 0 black to 1 white: far from 0.5 is under/over"

    def score(self, image: Image.Image) -> float:
        return float(_grey(image).mean() / 255)


class Clipping(QualityMetric):
    name = "exposure_clipped"
    measures = "fraction of face pixels crushed to black or blown to white: lower is better"

    def score(self, image: Image.Image) -> float:
        g = _grey(image)
        return float(np.mean((g <= 2) | (g >= 253)))


class Noise(QualityMetric):
    name = "noise_sigma"
    measures = ("noise standard deviation in grey levels (Immerkaer 1996, fast noise variance "
                "estimation), at the crop's own resolution: lower is cleaner")

    def score(self, image: Image.Image) -> float:
        g = _grey(image)
        if min(g.shape) < 3:
            return float("nan")
        # The mask [[1,-2,1],[-2,4,-2],[1,-2,1]] cancels image structure up to second order.
        r = (g[:-2, :-2] - 2 * g[:-2, 1:-1] + g[:-2, 2:]
             - 2 * g[1:-1, :-2] + 4 * g[1:-1, 1:-1] - 2 * g[1:-1, 2:]
             + g[2:, :-2] - 2 * g[2:, 1:-1] + g[2:, 2:])
        return float(math.sqrt(math.pi / 2) * np.abs(r).mean() / 6)


class Brisque(QualityMetric):
    """BRISQUE with the LIVE-trained model that ships in the `brisque` wheel.

    The wheel's own scorer imports OpenCV only to halve the image; this re-implements its
    features in numpy (OpenCV's bicubic halving included), so OpenCV is not needed. It agrees
    with the package (run with OpenCV) to within 0.1 on the sample photos, their blurred, noisy
    and JPEG-damaged copies, and 64 px noise.
    """

    name = "brisque_technical"
    measures = ("BRISQUE technical distortion (Mittal et al. 2012, trained on LIVE): lower is "
                "better, clean photo ~30, blurred ~75; it does not say whether a face looks real")

    def __init__(self) -> None:
        self.coef, self.support, self.gamma, self.rho, self.low, self.high = _brisque_model()

    def score(self, image: Image.Image) -> float:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
        grey = rgb @ np.array([0.2125, 0.7154, 0.0721])  # skimage's rgb2gray, as the package
        if min(grey.shape) < 16:
            return float("nan")
        features = np.array(_brisque_features(grey) + _brisque_features(_cubic_half(grey)))
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


_GAUSS7 = np.exp(-(np.arange(7) - 3.0) ** 2 / (2 * (7 / 6) ** 2))
_GAUSS7 /= _GAUSS7.sum()
# The AGGD shape parameter alpha solves phi(alpha) = R; phi rises monotonically, so a fine table
# inverted by interpolation gives the root the package finds with scipy.optimize.root.
_AGGD_ALPHA = np.arange(0.2, 10.0, 0.0005)
_AGGD_PHI = np.array([math.gamma(2 / a) ** 2 / (math.gamma(1 / a) * math.gamma(3 / a))
                      for a in _AGGD_ALPHA])


def _gauss_blur(x: np.ndarray) -> np.ndarray:
    """scipy.signal.convolve2d(x, 7x7 Gaussian, 'same') with zero padding, done separably."""
    padded = np.pad(x, 3)
    rows = sum(_GAUSS7[k] * padded[:, k:k + x.shape[1]] for k in range(7))
    return sum(_GAUSS7[k] * rows[k:k + x.shape[0], :] for k in range(7))


def _cubic_half(x: np.ndarray) -> np.ndarray:
    """cv2.resize(x, fx=0.5, fy=0.5, INTER_CUBIC): taps 2i-1..2i+2, a=-0.75, edges replicated."""
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


def _brisque_features(grey: np.ndarray) -> list[float]:
    mu = _gauss_blur(grey)
    sd = np.sqrt(np.abs(mu ** 2 - _gauss_blur(grey ** 2)))
    m = (grey - mu) / (sd + 1 / 255)
    alpha, _, sigma_l, sigma_r = _aggd_fit(m)
    features = [alpha, (sigma_l ** 2 + sigma_r ** 2) / 2]
    for pair in (m[:, :-1] * m[:, 1:], m[:-1] * m[1:], m[:-1, :-1] * m[1:, 1:],
                 m[1:, :-1] * m[:-1, 1:]):
        alpha, mean, sigma_l, sigma_r = _aggd_fit(pair)
        features += [alpha, mean, sigma_l ** 2, sigma_r ** 2]
    return features


def quality_metrics() -> tuple[list[QualityMetric], list[str]]:
    """The offline quality metrics that work here, and a note for each that does not."""
    metrics: list[QualityMetric] = [Sharpness(), Exposure(), Clipping(), Noise()]
    notes = []
    try:
        metrics.append(Brisque())
    except (ImportError, OSError, ValueError) as exc:
        notes.append(f"{Brisque.name} skipped: {exc}.")
    return metrics, notes


# ---------------------------------------------------------------------------------------------
# CLIP: zero-shot "is this a photograph?" and prompt adherence, when weights can be loaded.
# ---------------------------------------------------------------------------------------------

REALISM_PROMPTS = ("a photograph of a person", "a digital art illustration of a person",
                   "a 3D render of a person", "a painting of a person")


class ClipScorer:
    """CLIP scores of a whole image: `clip_photo_prob`, the zero-shot probability of the first
    of REALISM_PROMPTS against the others, and `clip_t_cosine`, the image-prompt cosine
    similarity that DreamBench calls CLIP-T."""

    photo_name = "clip_photo_prob"
    prompt_name = "clip_t_cosine"

    def __init__(self, model: str, device: str) -> None:
        local_only = not Path(model).is_dir() and not hub_reachable()
        if local_only:
            # Checked before importing transformers, which alone takes seconds.
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "config.json"), str):
                raise OSError("not in the local Hugging Face cache, and the hub cannot be "
                              "reached")
        from transformers import CLIPModel, CLIPProcessor

        self.device = pick_device(device)
        self.model = CLIPModel.from_pretrained(model, local_files_only=local_only)
        self.model = self.model.to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model, local_files_only=local_only)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    def score(self, image: Image.Image, prompt: str | None) -> dict[str, float]:
        import torch

        texts = list(REALISM_PROMPTS) + ([prompt] if prompt else [])
        inputs = self.processor(text=texts, images=[image], return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_tokens).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        probs = out.logits_per_image[0, :len(REALISM_PROMPTS)].softmax(-1)
        scores = {self.photo_name: float(probs[0])}
        if prompt:
            scores[self.prompt_name] = float(torch.nn.functional.cosine_similarity(
                out.image_embeds[0], out.text_embeds[-1], dim=0))
        return scores


@lru_cache(maxsize=2)
def _load_clip(model: str, device: str) -> ClipScorer:
    return ClipScorer(model, device)


def _clip_or_note(cfg: EvaluateConfig) -> tuple[ClipScorer | None, str]:
    if not cfg.clip_model:  # switched off on purpose: nothing to tell
        return None, ""
    try:
        return _load_clip(cfg.clip_model, cfg.device), ""
    except (OSError, ValueError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, (f"CLIP scores skipped: {cfg.clip_model!r} could not be loaded ({reason}). "
                      "On Colab it downloads by itself; offline, set clip_model to a local "
                      "folder, or to '' to skip CLIP.")


# ---------------------------------------------------------------------------------------------
# Consistency and diversity among the generated faces.
# ---------------------------------------------------------------------------------------------

CROP_SIDE = 64  # face crops for the diversity measure: enough for structure, cheap to compare


def _box7(x: np.ndarray) -> np.ndarray:
    """Mean over every 7x7 window of the last two axes (an integral image)."""
    c = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]).cumsum(-1).cumsum(-2)
    return (c[..., 7:, 7:] - c[..., :-7, 7:] - c[..., 7:, :-7] + c[..., :-7, :-7]) / 49


def _ssim_matrix(crops: np.ndarray) -> np.ndarray:
    """Mean SSIM (Wang et al. 2004, 7x7 windows) between every pair of grey crops (n x s x s)."""
    n = len(crops)
    out = np.ones((n, n))
    if n < 2:
        return out
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu = _box7(crops)
    var = _box7(crops ** 2) - mu ** 2
    i, j = np.triu_indices(n, 1)
    cov = _box7(crops[i] * crops[j]) - mu[i] * mu[j]
    ssim = (((2 * mu[i] * mu[j] + c1) * (2 * cov + c2))
            / ((mu[i] ** 2 + mu[j] ** 2 + c1) * (var[i] + var[j] + c2))).mean(axis=(1, 2))
    out[i, j] = out[j, i] = ssim
    return out


def _yaw(face: faces.Face) -> float:
    """The nose's sideways offset from the eye midpoint, in eye distances (0 = frontal).

    Measured along the eye line, so head tilt does not count as turning.
    """
    p = face.landmarks
    eye_a, eye_b, nose = p[0:2].mean(axis=0), p[2:4].mean(axis=0), p[4]
    axis = eye_b - eye_a
    span = float(np.linalg.norm(axis))
    return float(np.dot(nose - (eye_a + eye_b) / 2, axis) / span ** 2) if span else float("nan")


def _group_faces(idx: Sequence[int], names: Sequence[str], similarity: np.ndarray,
                 ssim: np.ndarray, yaws: np.ndarray) -> dict[str, Any]:
    """Consistency (identity likeness between generated faces), the odd one out, and
    diversity (structural dissimilarity of face crops, spread of head turn) of one group."""
    idx = np.asarray(idx, dtype=int)
    stats: dict[str, Any] = {"consistency_mean": np.nan, "consistency_min": np.nan,
                             "odd_one_out": "", "diversity_ssim": np.nan,
                             "pose_spread": float(np.nanstd(yaws[idx])) if len(idx) else np.nan}
    if len(idx) < 2:
        return stats
    sim = similarity[np.ix_(idx, idx)]
    off = ~np.eye(len(idx), dtype=bool)
    stats["consistency_mean"] = float(sim[off].mean())
    stats["consistency_min"] = float(sim[off].min())
    stats["diversity_ssim"] = float((1 - ssim[np.ix_(idx, idx)])[off].mean())
    if len(idx) >= 3:  # with two faces neither is odder than the other
        stats["odd_one_out"] = names[idx[int(np.argmin(_mean_to_others(sim)))]]
    return stats


def _consistency_per_image(n_images: int, face_rows: list[int], similarity: np.ndarray
                           ) -> np.ndarray:
    """Each face's mean likeness to the run's other faces (NaN without a face or a second one).

    Their mean is the run's consistency_mean, so a per-image column lets the sweep's intervals
    (headshot_kit.stats) resample images for consistency as they do for likeness."""
    out = np.full(n_images, np.nan)
    if len(face_rows) >= 2:
        out[face_rows] = _mean_to_others(similarity)
    return out


def _mean_to_others(sim: np.ndarray) -> np.ndarray:
    """Row means of a square similarity matrix without its diagonal (each face with itself)."""
    return (sim * ~np.eye(len(sim), dtype=bool)).sum(axis=1) / (len(sim) - 1)


def _face_region(image: Image.Image, face: faces.Face) -> Image.Image | None:
    left, top, right, bottom = face.box
    box = (max(0, left), max(0, top), min(image.width, right), min(image.height, bottom))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return None
    return image.crop(box)


def _crop_grey(image: Image.Image, face: faces.Face) -> np.ndarray:
    region = _face_region(image, face)
    region = region if region is not None else image
    return _grey(region.resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BILINEAR))


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What evaluate_images found; displays itself in a notebook."""

    scores: pd.DataFrame
    summary: pd.DataFrame
    headline: str
    out_dir: Path
    embedder: str
    run_id: str
    settings: dict[str, Any]
    config: EvaluateConfig
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        parts = [f"<h4>{html.escape(self.headline)}</h4>"]
        parts += [f"<p><i>{html.escape(note)}</i></p>" for note in self.notes]
        # The notes are shown above: in the table they would stretch one row into a band.
        table = self.summary.drop(columns=["notes"], errors="ignore")
        parts.append(table.to_html(index=False, na_rep="", float_format="{:.3f}".format))
        for key in ("likeness_by_style", "likeness_vs_quality", "consistency", "contact_sheet"):
            if key in self.files:
                data = base64.b64encode(self.files[key].read_bytes()).decode()
                parts.append(f'<img src="data:image/png;base64,{data}" style="max-width:100%">')
        parts.append(f"<p>Scores, plots and config in <code>{html.escape(str(self.out_dir))}"
                     "</code></p>")
        return "\n".join(parts)


def evaluate_images(references: PathLike | Sequence[PathLike], images: PathLike,
                    out_dir: PathLike, cfg: EvaluateConfig | None = None,
                    run_id: str | None = None, settings: dict[str, Any] | None = None,
                    progress: bool = True) -> EvalResult:
    """Score every image in `images` against the person in `references`; write into `out_dir`.

    `references`: a folder of photos of the person (the prepare stage's images/, or raw photos)
    or a list of photo files. `images`: the generate stage's folder (read through its
    manifest.csv) or any folder of images. `run_id` (default: the out_dir's name) and
    `settings` (default: the manifest's columns that are the same for every image, e.g. steps,
    lora_scale) are kept for the experiments table. `progress=False` hides the progress bar.
    """
    cfg = _check_config(cfg or EvaluateConfig())
    out_dir = Path(out_dir)
    embedder = get_embedder(cfg)
    reference_paths = _reference_files(references)
    generated, manifest = _generated_files(Path(images))
    metrics, notes = quality_metrics()
    clip, clip_note = _clip_or_note(cfg)
    notes += [clip_note] if clip_note else []
    prompts = ([p or None for p in manifest["prompt"].fillna("").astype(str)]
               if "prompt" in manifest.columns else [None] * len(generated))

    bar = tqdm(total=len(reference_paths) + len(generated), desc="evaluate",
               disable=not progress)
    bar.set_postfix(step="references")
    reference_vectors, skipped = [], []
    for path in reference_paths:
        found = _embed_photo(embedder, path)
        if found:
            reference_vectors.append(found[0][1])
        else:
            skipped.append(path.name)
        bar.update()
    if not reference_vectors:
        bar.close()
        raise NoFaceError(f"No face was found in any of the {len(reference_paths)} reference "
                          f"photos ({reference_paths[0].parent}); give clear, frontal photos "
                          "of the person, e.g. the prepare stage's images/ folder.")
    if skipped:
        notes.append(f"No face in {len(skipped)} reference photo(s), not used: "
                     f"{', '.join(skipped)}.")
    references_matrix = np.array(reference_vectors)

    bar.set_postfix(step="images")
    rows, thumbs, vectors, crops, yaws = [], [], {}, {}, {}
    for i, (path, name, prompt) in enumerate(zip(generated, manifest["file"], prompts)):
        image = load_image(path)
        row, face, vector = _score_image(image, embedder, references_matrix, metrics)
        row = {"image": str(name), **row}
        if clip is not None:
            row.update(clip.score(image, prompt))
        if face is not None:
            vectors[i], crops[i], yaws[i] = vector, _crop_grey(image, face), _yaw(face)
        rows.append(row)
        thumb = image.copy()
        thumb.thumbnail((256, 256))
        thumbs.append(thumb)
        bar.update()
    bar.close()

    # The manifest's columns (style, seed, prompt, ...) follow the scores; "file" is "image".
    extra = manifest.drop(columns=["file", *[c for c in manifest.columns if c in rows[0]]])
    scores = pd.concat([pd.DataFrame(rows), extra.reset_index(drop=True)], axis=1)
    face_rows = sorted(vectors)  # rows with a face; the tiny model's noise has none
    similarity, ssim = np.zeros((0, 0)), np.zeros((0, 0))
    if face_rows:
        matrix = np.array([vectors[i] for i in face_rows])
        similarity = embedder.similarity(matrix, matrix)
        ssim = _ssim_matrix(np.array([crops[i] for i in face_rows]))
    scores["consistency"] = _consistency_per_image(len(scores), face_rows, similarity)
    face_yaws = np.array([yaws[i] for i in face_rows])
    quality_cols = [m.name for m in metrics] + [c for c in (ClipScorer.photo_name,
                                                            ClipScorer.prompt_name)
                                                if c in scores.columns]
    summary = _summarise(scores, face_rows, similarity, ssim, face_yaws, quality_cols, notes)
    headline = _headline(scores, embedder, cfg.best_n)

    # A work folder's scores/ is named after the work folder: every run's is called "scores".
    run_id = run_id or (out_dir.absolute().parent.name if out_dir.name == SCORES
                        else out_dir.name)
    settings = {**_constant_settings(manifest), **(settings or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "scores.csv", scores.to_csv(index=False))
    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    pairs = similarity[np.triu_indices(len(face_rows), 1)]
    files = {
        "likeness_by_style": _save_figure(_plot_likeness_by_style(scores, embedder),
                                          out_dir / "likeness_by_style.png"),
        "likeness_vs_quality": _save_figure(_plot_likeness_vs_quality(scores, metrics),
                                            out_dir / "likeness_vs_quality.png"),
        "consistency": _save_figure(_plot_consistency(pairs, embedder),
                                    out_dir / "consistency.png"),
        "contact_sheet": _save_contact_sheet(scores, thumbs, run_id,
                                             out_dir / "contact_sheet.png"),
    }
    save_config(cfg, out_dir / "config.json", run_id=run_id, settings=settings,
                references=[str(p) for p in reference_paths], images=str(images),
                embedder_name=embedder.name, embedder_threshold=embedder.threshold,
                embedder_licence=embedder.licence, headline=headline, notes=notes,
                quality_metrics={m.name: m.measures for m in metrics})
    return EvalResult(scores=scores, summary=summary, headline=headline, out_dir=out_dir,
                      embedder=embedder.name, run_id=run_id, settings=settings, config=cfg,
                      notes=notes, files=files)


def _check_config(cfg: EvaluateConfig) -> EvaluateConfig:
    if cfg.best_n < 1:
        raise ConfigError(f"best_n is {cfg.best_n}; name at least 1 best image (8 is usual).")
    return cfg


def _folder_images(folder: Path) -> list[Path]:
    """Images in `folder`, or in its images/ subfolder (a prepare or generate stage folder)."""
    found = list_images(folder)
    if not found and (folder / "images").is_dir():
        found = list_images(folder / "images")
    return found


def _reference_files(references: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(references, (str, Path)):
        folder = Path(references)
        if not folder.is_dir():
            raise FileNotFoundError(f"Reference folder {folder} does not exist; point "
                                    "references at a folder of photos of the person.")
        paths = _folder_images(folder)
        if not paths:
            raise FileNotFoundError(f"No photos in {folder}; add 5-20 photos of the person "
                                    "or use the prepare stage's images/ folder.")
        return paths
    paths = [Path(p) for p in references]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"Reference photos missing: {', '.join(missing) or 'none given'}"
                                "; pass existing photo files or a folder of them.")
    return paths


def _generated_files(folder: Path) -> tuple[list[Path], pd.DataFrame]:
    """The images to score and a table (one row each, `file` first) of what is known of them."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist; point images at the "
                                "generate stage's output folder.")
    manifest_path = folder / "manifest.csv"
    if manifest_path.is_file():
        manifest = pd.read_csv(manifest_path)
        if "file" not in manifest.columns:
            raise ValueError(f"{manifest_path} has no 'file' column (the image path relative "
                             "to its folder); re-run the generate stage to rewrite it.")
        paths = [folder / str(f) for f in manifest["file"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{manifest_path} lists {len(missing)} image(s) that do not exist, e.g. "
                f"{missing[0]}; re-run the generate stage or delete those rows.")
    else:
        paths = _folder_images(folder)
        manifest = pd.DataFrame({"file": [p.relative_to(folder).as_posix() for p in paths]})
    if not paths:
        raise FileNotFoundError(f"No images in {folder}; run the generate stage first.")
    return paths, manifest


def _score_image(image: Image.Image, embedder: FaceEmbedder, references: np.ndarray,
                 metrics: Sequence[QualityMetric]
                 ) -> tuple[dict[str, Any], faces.Face | None, np.ndarray | None]:
    found = embedder.embed(image)
    row: dict[str, Any] = {"face_found": bool(found), "n_faces": len(found)}
    face, vector = found[0] if found else (None, None)
    if vector is not None:
        distances = embedder.distances(vector[None, :], references)[0]
        likeness = embedder.to_similarity(distances)
        row.update(likeness=float(likeness.mean()), likeness_best=float(likeness.max()),
                   distance_mean=float(distances.mean()),
                   same_person=bool(distances.mean() < embedder.threshold))
    else:
        row.update(likeness=np.nan, likeness_best=np.nan, distance_mean=np.nan,
                   same_person=False)
    row["embedder"] = embedder.name
    # Quality of the face is what a headshot is judged on; with no face, of the whole image.
    region = _face_region(image, face) if face is not None else None
    row["quality_region"] = "face" if region is not None else "image"
    for metric in metrics:
        row[metric.name] = metric.score(region if region is not None else image)
    return row, face, vector


def _summarise(scores: pd.DataFrame, face_rows: list[int], similarity: np.ndarray,
               ssim: np.ndarray, yaws: np.ndarray, quality_cols: list[str],
               notes: list[str]) -> pd.DataFrame:
    names = scores["image"].tolist()
    groups = [("all", scores.index)]
    if "style" in scores.columns:
        groups += [(str(style), rows.index) for style, rows in scores.groupby("style", sort=False)]
    position = {row: k for k, row in enumerate(face_rows)}
    face_names = [names[row] for row in face_rows]
    records = []
    for group, index in groups:
        part = scores.loc[index]
        record = {
            "group": group,
            "n_images": len(part),
            "faces_found": int(part["face_found"].sum()),
            "same_person": int(part["same_person"].sum()),
            "same_person_rate": float(part["same_person"].mean()),
            "likeness_mean": part["likeness"].mean(),
            "likeness_median": part["likeness"].median(),
            "likeness_best": part["likeness"].max(),
            **_group_faces([position[r] for r in index if r in position], face_names,
                           similarity, ssim, yaws),
        }
        record.update({f"{col}_mean": part[col].mean() for col in quality_cols})
        records.append(record)
    summary = pd.DataFrame(records)
    summary["notes"] = [" ".join(notes)] + [""] * (len(summary) - 1)
    return summary


def _headline(scores: pd.DataFrame, embedder: FaceEmbedder, best_n: int) -> str:
    text = (f"{int(scores['same_person'].sum())} of {len(scores)} look like you "
            f"({embedder.name}, threshold {embedder.threshold:g})")
    best = scores[scores["same_person"]].nlargest(best_n, "likeness")
    if len(best):
        text += f"; best {len(best)}: " + ", ".join(
            f"{Path(name).stem} ({value:.2f})" for name, value in zip(best["image"],
                                                                      best["likeness"]))
    no_face = int((~scores["face_found"]).sum())
    if no_face:
        text += f"; no face found in {no_face}"
    return text + "."


def _constant_settings(manifest: pd.DataFrame) -> dict[str, Any]:
    """Manifest columns with one value for the whole run (steps, lora_scale, ...): the run's
    settings. Prompts are sentences, not settings to plot against, and `starred` is the
    user's mark on an image, so both are left out."""
    settings = {}
    for col in manifest.columns:
        if (col in ("file", "starred") or "prompt" in col
                or manifest[col].nunique(dropna=False) != 1):
            continue
        value = manifest[col].iloc[0]
        # Plain Python values: config.json must stay valid JSON (no NaN, no numpy types).
        if pd.isna(value):
            value = None
        elif hasattr(value, "item"):
            value = value.item()
        settings[col] = value
    return settings


# ---------------------------------------------------------------------------------------------
# Pictures.
# ---------------------------------------------------------------------------------------------

SAME_COLOR, OTHER_COLOR, NO_FACE_COLOR = "#1b7f3a", "#c0392b", "#7f7f7f"
# Every embedder's same-person distance threshold maps onto this likeness (to_similarity).
SAME_PERSON_LIKENESS = 0.5


def _threshold_label(embedder: FaceEmbedder) -> str:
    return (f"same person: likeness above {SAME_PERSON_LIKENESS:g} ({embedder.name} "
            f"distance below {embedder.threshold:g})")


def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, pil_kwargs={"compress_level": 1})
    return path


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    # A bare Figure, not pyplot: saving 4 plots per run must not pile up open windows.
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _plot_likeness_by_style(scores: pd.DataFrame, embedder: FaceEmbedder):
    fig, (ax,) = _new_figure(6.5, 3.6)
    groups = (list(scores.groupby("style", sort=False)) if "style" in scores.columns
              else [("all images", scores)])
    rng = np.random.default_rng(0)  # fixed jitter: the same run draws the same picture
    for x, (_, part) in enumerate(groups):
        found = part[part["face_found"]]
        jitter = rng.uniform(-0.15, 0.15, len(found))
        colors = [SAME_COLOR if s else OTHER_COLOR for s in found["same_person"]]
        ax.scatter(x + jitter, found["likeness"], c=colors, s=22, zorder=3)
        if len(found):
            ax.hlines(found["likeness"].median(), x - 0.3, x + 0.3, color="black", lw=2)
        missing = len(part) - len(found)
        if missing:
            ax.scatter([x] * missing, [0] * missing, marker="x", c=NO_FACE_COLOR, s=30)
    ax.axhline(SAME_PERSON_LIKENESS, ls="--", c="grey", lw=1, label=_threshold_label(embedder))
    ax.set_xticks(range(len(groups)),
                  [f"{style}\n{int(p['same_person'].sum())}/{len(p)}" for style, p in groups])
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(f"likeness to you ({embedder.name})")
    ax.set_xlabel("style (look like you / images; x at 0 = no face)")
    ax.set_title("Likeness per style (bar: median)")
    ax.legend(loc="best", fontsize=8)
    return fig


def _plot_likeness_vs_quality(scores: pd.DataFrame, metrics: Sequence[QualityMetric]):
    shown = [m for m in metrics if m.name in scores.columns]
    found = scores[scores["face_found"]]
    if found.empty:  # nothing to plot: one sentence, not a row of empty panels
        fig, (ax,) = _new_figure(6.0, 1.6)
        ax.text(0.5, 0.5, f"No face found in any of the {len(scores)} images: no likeness to "
                "plot against quality.", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    fig, axes = _new_figure(3.0 * len(shown), 3.2, ncols=len(shown))
    colors = [SAME_COLOR if s else OTHER_COLOR for s in found["same_person"]]
    for ax, metric in zip(axes, shown):
        ax.scatter(found[metric.name], found["likeness"], c=colors, s=18)
        ax.axhline(SAME_PERSON_LIKENESS, ls="--", c="grey", lw=1)
        ax.set_xlabel(metric.name)
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("likeness to you")
    fig.suptitle("Likeness vs technical quality of the face (images without a face: "
                 f"{len(scores) - len(found)}, not shown)")
    return fig


def _plot_consistency(pairs: np.ndarray, embedder: FaceEmbedder):
    fig, (ax,) = _new_figure(5.5, 3.2)
    if len(pairs):
        ax.hist(pairs, bins=np.linspace(0, 1, 21), color="#4c72b0")
    else:
        ax.text(0.5, 0.5, "fewer than two faces: no pairs to compare", ha="center",
                transform=ax.transAxes)
    ax.axvline(SAME_PERSON_LIKENESS, ls="--", c="grey", lw=1, label=_threshold_label(embedder))
    ax.set_xlabel(f"likeness between two generated faces ({embedder.name})")
    ax.set_ylabel("pairs")
    ax.set_title("Consistency: do the headshots show one person?")
    ax.legend(fontsize=8)
    return fig


def _save_contact_sheet(scores: pd.DataFrame, thumbs: list[Image.Image], run_id: str,
                        path: Path) -> Path:
    # Best first: the top of the sheet is what a user would keep (FaceChain and EasyPhoto rank
    # their outputs the same way).
    order = scores.sort_values("likeness", ascending=False, na_position="last").index
    captions, colors = [], []
    for i in order:
        row = scores.loc[i]
        if row["face_found"]:
            verdict = "looks like you" if row["same_person"] else "someone else"
            line = f"likeness {row['likeness']:.2f} {verdict}"
            colors.append(SAME_COLOR if row["same_person"] else OTHER_COLOR)
        else:
            line = "no face found"
            colors.append(NO_FACE_COLOR)
        quality = f"sharp {row['sharpness_laplacian']:.0f}"
        if "brisque_technical" in row and not pd.isna(row["brisque_technical"]):
            quality += f"  brisque {row['brisque_technical']:.0f}"
        captions.append([Path(str(row["image"])).name, line, quality])
    sheet = contact_sheet([thumbs[i] for i in order], captions, colors=colors, cols=5,
                          title=f"{run_id}: {int(scores['same_person'].sum())} of {len(scores)} "
                                "look like you, best first")
    with atomic_path(path) as tmp:
        # Fast compression: the default level takes seconds on a 40-image sheet.
        sheet.save(tmp, format="PNG", compress_level=1)
    return path


# ---------------------------------------------------------------------------------------------
# Is the metric any good? Same-person vs different-person pairs on real photos.
# ---------------------------------------------------------------------------------------------


@dataclass
class MetricCheck:
    """Likeness of known same-person and different-person photo pairs."""

    pairs: pd.DataFrame  # a, b, expected_same, distance, likeness, predicted_same, correct
    embedder: str
    threshold: float

    @property
    def margin(self) -> float:
        """Lowest same-person likeness minus highest different-person likeness (> 0: apart)."""
        same = self.pairs[self.pairs["expected_same"]]["likeness"]
        other = self.pairs[~self.pairs["expected_same"]]["likeness"]
        return float(same.min() - other.max())

    @property
    def accuracy(self) -> float:
        return float(self.pairs["correct"].mean())

    def __str__(self) -> str:
        same = self.pairs[self.pairs["expected_same"]]["likeness"]
        other = self.pairs[~self.pairs["expected_same"]]["likeness"]
        return (f"{self.embedder} (threshold {self.threshold:g} -> likeness 0.5): same-person "
                f"pairs {same.min():.2f}-{same.max():.2f}, different-person pairs "
                f"{other.min():.2f}-{other.max():.2f}, margin {self.margin:+.2f}; "
                f"{int(self.pairs['correct'].sum())}/{len(self.pairs)} pairs judged right.")


def validate_metric(same_pairs: Sequence[tuple[PathLike, PathLike]],
                    different_pairs: Sequence[tuple[PathLike, PathLike]],
                    cfg: EvaluateConfig | None = None) -> MetricCheck:
    """Score pairs of real photos whose answer is known, to see that the embedder separates
    the same person from a different one before trusting it on generated images."""
    embedder = get_embedder(cfg)
    records = []
    for expected, pairs in ((True, same_pairs), (False, different_pairs)):
        for a, b in pairs:
            va, vb = _photo_vector(embedder, Path(a)), _photo_vector(embedder, Path(b))
            distance = float(embedder.distances(va[None], vb[None])[0, 0])
            predicted = distance < embedder.threshold
            records.append({"a": Path(a).name, "b": Path(b).name, "expected_same": expected,
                            "distance": distance,
                            "likeness": float(embedder.to_similarity(distance)),
                            "predicted_same": predicted, "correct": predicted == expected})
    if not records or all(r["expected_same"] for r in records) or not any(
            r["expected_same"] for r in records):
        raise ValueError("validate_metric needs at least one same-person pair and one "
                         "different-person pair.")
    return MetricCheck(pairs=pd.DataFrame(records), embedder=embedder.name,
                       threshold=embedder.threshold)


def _photo_vector(embedder: FaceEmbedder, path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the photo path.")
    found = _embed_photo(embedder, path)
    if not found:
        raise NoFaceError(f"{path}: no face found; validation needs photos that clearly show "
                          "one face.")
    return found[0][1]


# ---------------------------------------------------------------------------------------------
# Experiments: one row per evaluated run, and a plot of any metric against any setting.
# ---------------------------------------------------------------------------------------------

EXPERIMENTS_TABLE = Path("results/experiments.csv")


def record_experiment(result: EvalResult, run_id: str | None = None,
                      settings: dict[str, Any] | None = None,
                      table: PathLike = EXPERIMENTS_TABLE) -> pd.DataFrame:
    """Add (or, for a run id already there, replace) one row for `result` in `table`.

    The row holds the run id, a hash of the evaluation config and settings, the settings as
    columns and the overall summary's metrics. Returns the whole table.
    """
    table = Path(table)
    run_id = run_id or result.run_id
    settings = {**result.settings, **(settings or {})}
    overall = result.summary.iloc[0]
    metrics = {k: v for k, v in overall.items() if k not in ("group", "notes", "odd_one_out")}
    clashes = sorted(set(settings) & (set(metrics) | {"run_id", "recorded", "config_hash",
                                                      "embedder", "out_dir"}))
    if clashes:
        raise ValueError(f"setting name(s) {', '.join(clashes)} clash with the experiments "
                         "table's own columns; rename them.")
    fingerprint = json.dumps({"evaluate": to_dict(result.config), "settings": settings},
                             sort_keys=True, default=str)
    row = {"run_id": run_id, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "config_hash": hashlib.sha256(fingerprint.encode()).hexdigest()[:12],
           "embedder": result.embedder, **settings, **metrics, "out_dir": str(result.out_dir)}
    old = pd.read_csv(table) if table.is_file() else pd.DataFrame()
    if "run_id" in old.columns:
        old = old[old["run_id"].astype(str) != str(run_id)]
    new = pd.DataFrame([row])
    updated = new if old.empty else pd.concat([old, new], ignore_index=True)
    atomic_write_text(table, updated.to_csv(index=False))
    return updated


def compare(table: PathLike | pd.DataFrame, setting: str, metric: str, ax=None):
    """Plot `metric` against `setting` over the runs in the experiments table.

    Each dot is a run. For the same-person rate, median likeness and consistency the line joins
    each setting value's estimate over all its runs' images, the bars are its 95% bootstrap
    interval over runs (seeds) and images (headshot_kit.stats), and the title gives the
    verdict. For other metrics the line joins the runs' mean and the bars span one standard
    deviation.
    """
    import matplotlib.pyplot as plt

    data = table if isinstance(table, pd.DataFrame) else pd.read_csv(table)
    for name, what in ((setting, "setting"), (metric, "metric")):
        if name not in data.columns:
            raise ValueError(f"The experiments table has no {what} {name!r}; its columns are "
                             f"{', '.join(map(str, data.columns))}.")
    with_intervals = metric in INTERVAL_METRICS and "out_dir" in data.columns
    intervals = (seed_intervals(data.dropna(subset=[setting]), [setting], [metric])
                 if with_intervals else None)
    data = data[[setting, metric]].dropna()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    numeric = pd.api.types.is_numeric_dtype(data[setting])
    values = sorted(data[setting].unique()) if numeric else list(dict.fromkeys(data[setting]))
    xs = values if numeric else list(range(len(values)))
    ax.scatter([xs[values.index(v)] for v in data[setting]], data[metric], alpha=0.5, s=20,
               label="runs")
    title = f"{metric} vs {setting} ({len(data)} runs)"
    if intervals is not None:
        found = intervals.set_index(setting).reindex(values)
        ax.errorbar(xs, found["estimate"], marker="o", capsize=4, color="black",
                    yerr=[(found["estimate"] - found["low"]).fillna(0),
                          (found["high"] - found["estimate"]).fillna(0)],
                    label="95% interval (bootstrap over seeds and images)")
        title += f": {intervals['verdict'].iloc[0]}"
    else:
        stats = data.groupby(setting)[metric].agg(["mean", "std"]).reindex(values)
        ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=4,
                    color="black", label="mean ± 1 s.d.")
    # Ticks at the values that ran, only: a sweep over rank 4 and 8 has no rank 4.5.
    ax.set_xticks(xs, [f"{v:g}" if numeric else str(v) for v in values])
    ax.set_xlabel(setting)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure
