"""Faces, found and described offline with dlib.

The prepare stage (which face to crop, is this photo someone else?) and the evaluate stage (does
the headshot look like you?) both stand on this module, so they measure identity the same way.
`face_mask` outlines the face and hair from dlib's 68 landmarks: the prepare stage writes one
beside each photo and the train stage weights its loss by it.

dlib comes from the `dlib-bin` wheel and its model files from `face-recognition-models` (CC0).
That package's `__init__` imports `pkg_resources`, which recent setuptools no longer ships, so
its folder is located with `importlib.util.find_spec` and the package is never imported.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# dlib's published threshold for its ResNet descriptor: distances below it are the same person
# (99.38% on LFW, http://dlib.net/face_recognition.py.html).
DLIB_SAME_PERSON_DISTANCE = 0.6
EMBEDDER_NAME = "dlib-resnet-128"


class FaceModelsMissing(RuntimeError):
    pass


@dataclass
class Face:
    """One detected face, in the coordinates of the image it was found in."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    score: float  # detector confidence (HOG SVM margin); higher is surer
    landmarks: np.ndarray  # 5 x 2: right eye (2 points), left eye (2 points), nose base

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelsMissing(
            "The dlib face model files are missing: run `pip install face-recognition-models`.")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@lru_cache(maxsize=1)
def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise FaceModelsMissing(
            "dlib is not installed: run `pip install dlib-bin` (a prebuilt wheel).") from exc
    folder = models_dir()
    detector = dlib.get_frontal_face_detector()
    shape5 = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(
        str(folder / "dlib_face_recognition_resnet_model_v1.dat"))
    return dlib, detector, shape5, encoder


@lru_cache(maxsize=1)
def _shape68():
    """dlib's 68-point landmark model (jawline, eyebrows, eyes, nose, mouth), loaded on first
    use only: it is 100 MB and only the masks need it. None when the file is missing."""
    dlib = _dlib()[0]
    path = models_dir() / "shape_predictor_68_face_landmarks.dat"
    return dlib.shape_predictor(str(path)) if path.is_file() else None


def clip_box(box: tuple[float, ...], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """`box` cut to an image of `size`, never empty (a face at the edge still has a pixel)."""
    left = min(max(0, int(box[0])), size[0] - 1)
    top = min(max(0, int(box[1])), size[1] - 1)
    return (left, top, max(min(size[0], math.ceil(box[2])), left + 1),
            max(min(size[1], math.ceil(box[3])), top + 1))


def to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def detect_faces(image: Image.Image, upsample: int = 1, max_side: int = 1024) -> list[Face]:
    """All faces in `image`, largest first, in the image's own pixel coordinates.

    Detection runs on a copy whose long side is at most `max_side` (a 12 MP photo would take
    seconds at full size); boxes and landmarks are scaled back.
    """
    dlib, detector, shape5, _ = _dlib()
    scale = min(1.0, max_side / max(image.size))
    small = image if scale == 1.0 else image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
        Image.Resampling.BILINEAR)
    pixels = to_rgb_array(small)
    rects, scores, _ = detector.run(pixels, upsample, 0.0)
    faces = []
    for rect, score in zip(rects, scores):
        shape = shape5(pixels, rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64) / scale
        box = tuple(int(round(v / scale)) for v in (rect.left(), rect.top(), rect.right(),
                                                    rect.bottom()))
        faces.append(Face(box=box, score=float(score), landmarks=points))
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces


def describe_face(image: Image.Image, face: Face, jitter: int = 0) -> np.ndarray:
    """dlib's 128-d identity descriptor of `face` (Euclidean distance < 0.6: same person)."""
    dlib, _, shape5, encoder = _dlib()
    pixels = to_rgb_array(image)
    rect = dlib.rectangle(*face.box)
    shape = shape5(pixels, rect)
    return np.array(encoder.compute_face_descriptor(pixels, shape, jitter), dtype=np.float64)


def face_with_margin(image: Image.Image, face: Face) -> tuple[Image.Image, Face]:
    """The face with a margin of half its size, and the face in its coordinates: dlib's
    descriptor and landmarks need only this much, and copying a 12 MP photo into numpy for them
    would not be free."""
    margin = max(face.width, face.height) // 2
    left, top = max(0, face.box[0] - margin), max(0, face.box[1] - margin)
    right = min(image.width, face.box[2] + margin)
    bottom = min(image.height, face.box[3] + margin)
    shifted = Face(box=(face.box[0] - left, face.box[1] - top, face.box[2] - left,
                        face.box[3] - top),
                   score=face.score, landmarks=face.landmarks - (left, top))
    return image.crop((left, top, right, bottom)), shifted


def landmarks68(image: Image.Image, face: Face) -> np.ndarray | None:
    """dlib's 68 landmarks of `face` (68 x 2, in the image's coordinates): jawline 0-16,
    eyebrows 17-26, nose 27-35, eyes 36-47, mouth 48-67. None where they cannot be computed
    (the model file is missing)."""
    predictor = _shape68()
    if predictor is None:
        return None
    dlib = _dlib()[0]
    region, shifted = face_with_margin(image, face)
    shape = predictor(to_rgb_array(region), dlib.rectangle(*shifted.box))
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    return points + (face.box[0] - shifted.box[0], face.box[1] - shifted.box[1])


# The head's outline, in units of the face's own size (see `face_mask`). The hair's top sits
# about 0.8 brow-to-chin lengths above the eyebrows (the face's thirds: hairline one third of
# the face above the brows, then the crown and the hair on it); hair and ears reach about 0.55
# jaw widths to each side of the face's centre line (the jaw's ends sit at the ears).
HEAD_ABOVE_BROWS = 0.8
HEAD_BELOW_BROWS = 0.6
HEAD_HALF_WIDTH = 0.55
# The mask fades out over about this fraction of the face box's side (a Gaussian's sigma): the
# weight falls off across the hair's edge and the collar instead of cutting a line.
MASK_FEATHER = 0.06


def face_mask(image: Image.Image, face: Face) -> Image.Image:
    """A soft mask of the face and hair of `face` ('L', the size of `image`, 255 inside).

    The outline of the jawline and eyebrows, an ellipse over forehead, hair and ears above and
    beside it, and the face box, blurred at the edges. The ellipse follows the face's own axis
    (eyebrows to chin), so a tilted head gets a tilted outline. A face whose 68 landmarks
    cannot be computed gets the same outline from its box (eyebrows to chin, as dlib draws it).
    """
    points = landmarks68(image, face)
    left, top, right, bottom = face.box
    if points is None:
        outline = np.array([(left, top), (right, top), (right, bottom), (left, bottom)], float)
        brows, chin = np.array([(left + right) / 2, top]), np.array([(left + right) / 2, bottom])
        width = float(right - left)
    else:
        # Round the jawline (ear to chin to ear), back along the eyebrows.
        outline = np.concatenate([points[0:17], points[26:16:-1]])
        brows, chin = points[17:27].mean(axis=0), points[8]
        width = float(np.hypot(*(points[16] - points[0])))
    length = max(float(np.hypot(*(brows - chin))), 1.0)
    up = (brows - chin) / length
    side = np.array([-up[1], up[0]])
    # An ellipse centred on the eyebrows, taller above them than below.
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    reach = np.where(np.sin(angles) > 0, HEAD_ABOVE_BROWS, HEAD_BELOW_BROWS) * length
    ellipse = (brows + np.outer(np.cos(angles) * HEAD_HALF_WIDTH * width, side)
               + np.outer(np.sin(angles) * reach, up))
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    for shape in (outline, ellipse):
        draw.polygon([tuple(p) for p in shape], fill=255)
    draw.rectangle((left, top, right, bottom), fill=255)
    soft = mask.filter(ImageFilter.GaussianBlur(MASK_FEATHER * max(face.width, face.height)))
    # Doubled: the blur halves the outline's own edge, and the chin or the hair's edge should
    # keep full weight, fading only outside it.
    return soft.point(lambda v: min(255, 2 * v))


def face_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def distance_to_similarity(distance: float | np.ndarray,
                           threshold: float = DLIB_SAME_PERSON_DISTANCE) -> np.ndarray:
    """Map an embedder's distance onto a 0-1 likeness where its same-person threshold lands
    on 0.5 (dlib's 0.6 by default).

    Linear, so it keeps the distance's ordering: 0 is identical, twice the threshold and
    beyond is 0. Every embedder's likeness goes through here.
    """
    return np.clip(1.0 - np.asarray(distance) / (2 * threshold), 0.0, 1.0)


def eyes_and_nose(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two eye centres (image-right first) and the nose base, from dlib's 5 points (two
    corners of each eye, then the nose base)."""
    a, b = landmarks[0:2].mean(axis=0), landmarks[2:4].mean(axis=0)
    return (a, b, landmarks[4]) if a[0] >= b[0] else (b, a, landmarks[4])


def head_pose(landmarks: np.ndarray) -> tuple[float, float]:
    """Approximate (yaw, roll) in degrees from the 5 landmarks; yaw > 0 is the nose towards
    the image's right, roll > 0 the head tilted clockwise on screen.

    The nose base sits about half an eye distance in front of the eyes, so its sideways
    offset from their midpoint, measured along the eye line (a tilt does not count as a
    turn), is about 0.5 * tan(yaw) eye distances.
    """
    right, left, nose = eyes_and_nose(landmarks)
    line = right - left
    dist = max(float(np.hypot(*line)), 1e-6)
    roll = math.degrees(math.atan2(line[1], line[0]))
    offset = float(np.dot(nose - (right + left) / 2, line / dist)) / dist
    return math.degrees(math.atan(2 * offset)), roll
