"""The evaluate stage on real photos: Obama references, Obama/Biden/noise "generated" images.

Reference photos are described once per session (the stage caches them by content), and the
main evaluation runs once per module, so the file stays fast on a small CPU.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from conftest import assert_drawn

from headshot_kit.config import ConfigError, EvaluateConfig
from headshot_kit.evaluate import (EMBEDDERS, EmbedderUnavailable, compare, evaluate_images,
                                   get_embedder, quality_metrics, record_experiment,
                                   validate_metric)
from headshot_kit.images import load_image

OBAMAS = ("obama.jpg", "obama2.jpg", "obama3.jpg")
NO_CLIP = EvaluateConfig(clip_model="")


def _noise(path: Path, side: int = 64) -> Path:
    """What the tiny test model generates: noise with no face in it."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _manifest(folder: Path, rows: list[tuple[str, str, int]]) -> None:
    pd.DataFrame({"file": [f for f, _, _ in rows], "style": [s for _, s, _ in rows],
                  "seed": [n for _, _, n in rows], "prompt": "a photo of ohwx person",
                  "steps": 30, "guidance": 7.0, "lora_scale": 1.0}
                 ).to_csv(folder / "manifest.csv", index=False)


@pytest.fixture(scope="module")
def references(samples, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("references")
    for name in OBAMAS:
        shutil.copy(samples / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def generated(samples, tmp_path_factory) -> Path:
    """A generate-stage folder: two Obamas (corporate), Biden and a faceless image (creative)."""
    folder = tmp_path_factory.mktemp("generated")
    (folder / "images").mkdir()
    for name in ("obama2.jpg", "obama3.jpg", "biden.jpg"):
        shutil.copy(samples / name, folder / "images" / name)
    _noise(folder / "images" / "noise.png")
    _manifest(folder, [("images/obama2.jpg", "corporate", 0), ("images/obama3.jpg", "corporate", 1),
                       ("images/biden.jpg", "creative", 0), ("images/noise.png", "creative", 1)])
    return folder


@pytest.fixture(scope="module")
def result(references, generated, tmp_path_factory):
    return evaluate_images(references, generated, tmp_path_factory.mktemp("eval") / "run-a",
                           NO_CLIP)


def test_metric_separates_same_person_from_different_person(samples):
    obama, obama2, obama3, biden = (samples / n for n in (*OBAMAS, "biden.jpg"))
    check = validate_metric([(obama, obama2), (obama, obama3), (obama2, obama3)],
                            [(obama, biden), (obama2, biden), (obama3, biden)])
    pairs = check.pairs.set_index(["a", "b"])
    # dlib distances measured on these photos (data/samples/PROVENANCE.md).
    assert pairs.loc[("obama.jpg", "obama2.jpg"), "distance"] == pytest.approx(0.346, abs=0.02)
    assert pairs.loc[("obama.jpg", "biden.jpg"), "distance"] == pytest.approx(0.84, abs=0.03)
    same = check.pairs[check.pairs["expected_same"]]
    other = check.pairs[~check.pairs["expected_same"]]
    assert (same["likeness"] > 0.5).all() and (other["likeness"] < 0.5).all()
    assert check.accuracy == 1.0 and check.margin > 0.2
    assert check.embedder == "dlib-resnet-128" and "dlib-resnet-128" in str(check)


def test_same_person_column_and_per_style_summary(result):
    scores = result.scores.set_index("image")
    assert scores["same_person"].to_dict() == {
        "images/obama2.jpg": True, "images/obama3.jpg": True,
        "images/biden.jpg": False, "images/noise.png": False}
    assert (scores.loc[["images/obama2.jpg", "images/obama3.jpg"], "likeness"] > 0.5).all()
    assert scores.loc["images/biden.jpg", "likeness"] < 0.5
    # Manifest columns are merged in, and the run's constant ones become its settings.
    assert scores.loc["images/biden.jpg", "style"] == "creative"
    assert result.settings == {"steps": 30, "guidance": 7.0, "lora_scale": 1.0}
    summary = result.summary.set_index("group")
    counts = ["n_images", "faces_found", "same_person"]
    assert summary.loc["corporate", counts].tolist() == [2, 2, 2]
    assert summary.loc["creative", counts].tolist() == [2, 1, 0]
    assert summary.loc["all", "odd_one_out"] == "images/biden.jpg"
    # CLIP switched off is a choice, not a note.
    assert "CLIP" not in str(summary.loc["all", "notes"])


def test_image_without_a_face_is_a_counted_failure(result):
    noise = result.scores.set_index("image").loc["images/noise.png"]
    assert not noise["face_found"] and not noise["same_person"]
    assert np.isnan(noise["likeness"]) and noise["quality_region"] == "image"
    assert result.summary.set_index("group").loc["all", "n_images"] == 4
    assert result.headline.startswith("2 of 4 look like you (dlib-resnet-128, threshold 0.6)")
    assert "no face found in 1" in result.headline


def test_scores_name_their_embedder_and_files_are_written(result):
    assert (result.scores["embedder"] == "dlib-resnet-128").all()
    on_disk = pd.read_csv(result.out_dir / "scores.csv")
    assert on_disk["same_person"].tolist() == result.scores["same_person"].tolist()
    assert (on_disk["embedder"] == "dlib-resnet-128").all()
    assert len(pd.read_csv(result.out_dir / "summary.csv")) == len(result.summary)
    for name in ("likeness_by_style.png", "likeness_vs_quality.png", "consistency.png",
                 "contact_sheet.png"):
        assert_drawn(result.out_dir / name, min_size=(400, 250))
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["embedder_name"] == "dlib-resnet-128"
    assert re.fullmatch(r"run-a-\d{8}-\d{6}-\d{3}", config["run_id"])  # folder and time
    html = result._repr_html_()
    assert result.headline.split(";")[0] in html and html.count("<img") == 4


def test_copies_are_consistent_and_not_diverse(samples, references, tmp_path):
    copies, distinct = tmp_path / "copies", tmp_path / "distinct"
    copies.mkdir(), distinct.mkdir()
    for i in range(3):
        shutil.copy(samples / "obama2.jpg", copies / f"copy{i}.jpg")
    for name in OBAMAS:
        shutil.copy(samples / name, distinct / name)
    same = evaluate_images(references, copies, tmp_path / "out-copies", NO_CLIP).summary.iloc[0]
    varied = evaluate_images(references, distinct, tmp_path / "out-distinct",
                             NO_CLIP).summary.iloc[0]
    assert same["consistency_mean"] == pytest.approx(1.0)
    assert same["diversity_ssim"] == pytest.approx(0.0, abs=1e-9)
    assert same["pose_spread"] == pytest.approx(0.0, abs=1e-9)
    assert 0.5 < varied["consistency_mean"] < same["consistency_mean"] - 0.1
    assert varied["diversity_ssim"] > 0.3
    assert varied["pose_spread"] > 0.0


def test_quality_metrics_respond_to_the_damage_they_measure(samples):
    metrics, notes = quality_metrics()
    assert notes == []  # brisque ships in the environment: all five metrics run
    clean = load_image(samples / "obama.jpg").resize((512, 640))
    blurred = clean.filter(ImageFilter.GaussianBlur(3))
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(np.clip(np.asarray(clean) + rng.normal(0, 20, (640, 512, 3)),
                                    0, 255).astype(np.uint8))
    dark = ImageEnhance.Brightness(clean).enhance(0.3)
    buffer = io.BytesIO()
    clean.save(buffer, "JPEG", quality=5)
    jpeg = Image.open(buffer).convert("RGB")
    score = {m.name: m.score for m in metrics}
    assert set(score) == {"sharpness", "brightness", "highlights_clipped", "shadows_clipped",
                          "noise_sigma", "brisque_technical"}
    # The brisque package's own score of this image (measured with OpenCV installed): 29.206.
    assert score["brisque_technical"](clean) == pytest.approx(29.206, abs=0.05)
    assert score["brisque_technical"](blurred) > 60 and score["brisque_technical"](jpeg) > 70
    assert score["sharpness"](blurred) < score["sharpness"](clean) / 3
    assert score["noise_sigma"](noisy) > 4 * score["noise_sigma"](clean)
    assert score["brightness"](dark) < score["brightness"](clean) - 0.2
    assert score["highlights_clipped"](clean) < 0.05
    assert score["highlights_clipped"](ImageEnhance.Brightness(clean).enhance(3.0)) > 0.2
    assert score["shadows_clipped"](ImageEnhance.Brightness(clean).enhance(0.1)) > 0.2
    assert score["shadows_clipped"](clean) < score["shadows_clipped"](dark)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny CLIP with random weights, saved the way a hub model is and loaded from there."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers),
                        projection_dim=16)
    model_dir = tmp_path_factory.mktemp("tiny-clip")
    with torch.random.fork_rng():  # the same weights every run, the suite's RNG untouched
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(model_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer).save_pretrained(model_dir)
    return model_dir


def clip_scores_by_hand(model_dir: Path, image: Path, prompt: str) -> tuple[float, float]:
    """CLIP's zero-shot "photograph" probability and CLIP-T cosine, from the model's own
    projected features: each text encoded on its own, softmax of the scaled cosines."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from headshot_kit.evaluate.clip import REALISM_PROMPTS

    model, processor = CLIPModel.from_pretrained(model_dir), CLIPProcessor.from_pretrained(
        model_dir)
    with torch.no_grad():
        pixels = processor.image_processor(images=[Image.open(image).convert("RGB")],
                                           return_tensors="pt")["pixel_values"]
        seen = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

        def text(words: str) -> torch.Tensor:
            ids = processor.tokenizer([words], return_tensors="pt")["input_ids"]
            return model.text_projection(model.text_model(input_ids=ids).pooler_output)

        unit = torch.nn.functional.normalize
        realism = unit(torch.cat([text(p) for p in REALISM_PROMPTS])) @ unit(seen)[0]
        photo = (model.logit_scale.exp() * realism).softmax(0)[0]
        cosine = unit(text(prompt))[0] @ unit(seen)[0]
    return float(photo), float(cosine)


def test_clip_scores_from_a_local_model_and_a_note_when_missing(references, tiny_clip, tmp_path,
                                                               monkeypatch):
    images = tmp_path / "gen"
    (images / "images").mkdir(parents=True)
    _noise(images / "images" / "noise.png")
    _manifest(images, [("images/noise.png", "creative", 0)])
    clip = evaluate_images(references, images, tmp_path / "clip",
                           EvaluateConfig(clip_model=str(tiny_clip), device="cpu"))
    # A run of faceless images (the tiny model's output) is scored, not skipped or crashed on.
    assert clip.headline.startswith("0 of 1 look like you")
    # The scores written are the model's own, for the first realism prompt and the image's
    # prompt; four random prompts are not equally likely, so a wrong one would show.
    photo, cosine = clip_scores_by_hand(tiny_clip, images / "images" / "noise.png",
                                        "a photo of ohwx person")
    scores = pd.read_csv(tmp_path / "clip" / "scores.csv").iloc[0]
    assert scores["clip_photo_prob"] == pytest.approx(photo, abs=1e-5)
    assert scores["clip_t_cosine"] == pytest.approx(cosine, abs=1e-5)
    assert abs(photo - 0.25) > 0.005

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = evaluate_images(references, images, tmp_path / "no-clip",
                              EvaluateConfig(clip_model="headshot-kit/no-such-clip"))
    assert not {"clip_photo_prob", "clip_t_cosine"} & set(missing.scores.columns)
    assert "'headshot-kit/no-such-clip' could not be loaded" in missing.summary.loc[0, "notes"]


def test_unavailable_embedders_say_what_to_install(monkeypatch):
    assert {"dlib", "arcface", "facenet"} <= set(EMBEDDERS)
    monkeypatch.setitem(sys.modules, "insightface", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)
    with pytest.raises(EmbedderUnavailable, match="pip install insightface.*non-commercial"):
        get_embedder(EvaluateConfig(embedder="arcface"))
    with pytest.raises(EmbedderUnavailable, match="pip install facenet-pytorch.*download"):
        get_embedder(EvaluateConfig(embedder="facenet"))
    with pytest.raises(ConfigError, match="choose one of auto, dlib, sface, arcface, facenet"):
        get_embedder(EvaluateConfig(embedder="vgg"))


def test_experiments_table_gains_a_row_per_run_and_compare_plots_it(result, tmp_path):
    import matplotlib.pyplot as plt

    table = tmp_path / "experiments.csv"
    for run, scale, seed in (("a", 0.8, 0), ("b", 0.8, 1), ("c", 1.0, 0)):
        rows = record_experiment(result, run, {"lora_scale": scale, "seed": seed}, table=table)
        assert len(rows) == len(pd.read_csv(table))
    assert pd.read_csv(table)["run_id"].tolist() == ["a", "b", "c"]
    record_experiment(result, "c", {"lora_scale": 1.0, "seed": 0}, table=table)
    data = pd.read_csv(table)
    assert len(data) == 3 and data["config_hash"].nunique() == 3
    assert data["same_person"].tolist() == [2, 2, 2] and data["steps"].tolist() == [30] * 3
    fig = compare(table, "lora_scale", "likeness_mean")
    assert fig.axes[0].get_xlabel() == "lora_scale"
    assert fig.axes[0].get_ylabel() == "likeness_mean"
    plt.close(fig)
    with pytest.raises(ValueError, match="no setting 'rank'"):
        compare(table, "rank", "likeness_mean")


def test_a_pack_without_faces_reads_plainly(references, tmp_path):
    from headshot_kit.evaluate.plots import plot_likeness_vs_quality

    pack = tmp_path / "work" / "headshots"
    (pack / "images").mkdir(parents=True)
    for seed in (0, 1):
        _noise(pack / "images" / f"corporate_seed{seed}.png")
    _manifest(pack, [(f"images/corporate_seed{s}.png", "corporate", s) for s in (0, 1)])
    result = evaluate_images(references, pack, tmp_path / "work" / "scores", NO_CLIP)
    # Named after the work folder (every work folder's scores/ would otherwise be "scores"),
    # and when it was evaluated.
    assert re.fullmatch(r"work-\d{8}-\d{6}-\d{3}", result.run_id)
    # One sentence instead of a row of empty panels.
    assert len(plot_likeness_vs_quality(result.scores, quality_metrics()[0]).axes) == 1
    assert "notes" not in result._repr_html_().split("<table")[1]


def test_compare_ticks_only_the_values_that_ran():
    table = pd.DataFrame({"rank": [4, 4, 8, 8], "same_person_rate": [0.2, 0.3, 0.5, 0.6]})
    fig = compare(table, "rank", "same_person_rate")
    assert list(fig.axes[0].get_xticks()) == [4, 8]


def test_each_evaluation_of_a_work_folder_is_a_row_of_its_own(references, tmp_path,
                                                              monkeypatch):
    """Evaluating the same work folder again (after training again) appends a row to the
    experiments table instead of replacing the last one, and the contact sheet's title is the
    verdict, not the folder's name."""
    from headshot_kit.evaluate import plots

    titles = []
    real = plots.card_sheet
    monkeypatch.setattr(plots, "card_sheet",
                        lambda cards, **kw: titles.append(kw["title"]) or real(cards, **kw))
    pack = tmp_path / "demo" / "headshots"
    (pack / "images").mkdir(parents=True)
    _noise(pack / "images" / "corporate_seed0.png")
    _manifest(pack, [("images/corporate_seed0.png", "corporate", 0)])
    table = tmp_path / "demo" / "experiments.csv"
    for _ in range(2):
        result = evaluate_images(references, pack, tmp_path / "demo" / "scores", NO_CLIP,
                                 progress=False)
        record_experiment(result, table=table)
    assert len(pd.read_csv(table)) == 2
    assert pd.read_csv(table)["run_id"].nunique() == 2
    assert titles == ["0 of 1 look like you, best first"] * 2
