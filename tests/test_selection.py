"""The checkpoint chosen by likeness: validation images scored against the prepared photos, the
most alike step's LoRA kept in best/ beside the last one, generate rendering with it, and the
evaluate report naming the network that chose and the one that scored.

The tiny model's renders have no faces, so real photos stand in for the validation images of
the steps that should (and should not) look like the person.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from headshot_kit.config import EvaluateConfig, get_preset
from headshot_kit.evaluate import embedders
from headshot_kit.lora import BEST_DIR, LORA_WEIGHTS, save_lora
from headshot_kit.storage import safetensors_digest
from headshot_kit.train import Trainer, train_lora
from headshot_kit.train.selection import choose_best, step_score


def tiny(**changes):
    quick = {"steps": 6, "validate_every": 2, "checkpoint_every": 0}
    return dataclasses.replace(get_preset("tiny").train, **{**quick, **changes})


def noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))


@pytest.fixture(scope="module")
def chosen_run(prepared_dataset, samples, tmp_path_factory):
    """Step 2 "renders" Biden and noise, step 4 two Obama faces that are not the training
    photos (the cut-off one, and obama2 mirrored), step 6 two training photos as they are
    (copies: the most alike, and passed over); the LoRA as it stood at each validation is
    saved aside for comparison."""
    out = tmp_path_factory.mktemp("chosen")
    photo = {n: Image.open(samples / n).convert("RGB") for n in
             ("biden.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg")}
    shown = {2: [photo["biden.jpg"], noise()],
             4: [photo["obama_partial_face.jpg"], ImageOps.mirror(photo["obama2.jpg"])],
             6: [photo["obama2.jpg"], photo["obama3.jpg"]]}
    calls = []

    def fake_render(self, prompt, seed):
        calls.append(self.step)
        return shown[self.step][calls.count(self.step) - 1]

    def keep_aside(trainer, step, images, grid):
        save_lora(out / "aside" / str(step), trainer.cfg.family, {"unet": trainer.pipe.unet})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_render_validation", fake_render)
        result = train_lora(prepared_dataset, out / "lora", tiny(), progress=False,
                            on_validation=keep_aside)
    return result, out


def test_the_most_alike_checkpoint_is_kept_beside_the_last(chosen_run):
    result, out = chosen_run
    assert result.best_step == 4 and result.chosen_by == "dlib-resnet-128"
    best = result.out_dir / BEST_DIR
    # The weights of step 4, not of the last step.
    assert safetensors_digest(best / LORA_WEIGHTS) == safetensors_digest(
        out / "aside" / "4" / LORA_WEIGHTS)
    assert safetensors_digest(result.lora_path) != safetensors_digest(best / LORA_WEIGHTS)
    record = json.loads((best / "config.json").read_text())
    assert record["step"] == 4 and record["checkpoint"] == "best" and record["token"] == "ohwx"
    assert record["likeness"] > 0.5  # two photos of the person
    metrics = pd.read_csv(result.out_dir / "metrics.csv")
    scored = metrics.dropna(subset=["likeness"])
    assert list(scored["step"]) == [2, 4, 6]
    # Step 6 copies the training photos: the most alike, passed over.
    assert scored["likeness"].idxmax() == scored.index[2]
    assert list(scored["copies"]) == [0, 0, 2]
    last = json.loads((result.out_dir / "config.json").read_text())
    assert last["best_step"] == 4 and last["checkpoint_chosen_by"] == "dlib-resnet-128"
    card = (result.out_dir / "README.md").read_text()
    assert "weights of step 4" in card and "ties to the later step" in card


def test_generate_renders_with_the_chosen_checkpoint_or_the_last(chosen_run, pipe, tmp_path,
                                                                 capsys):
    from headshot_kit.generate import generate_pack, weights_digest

    result, _ = chosen_run
    cfg = dataclasses.replace(get_preset("tiny").generate, styles=["corporate"], seeds=[0],
                              steps=2)
    pack = generate_pack(result.out_dir, tmp_path / "best", cfg, pipe=pipe, progress=False)
    assert "most alike checkpoint (step 4" in capsys.readouterr().out
    saved = json.loads((pack.out_dir / "config.json").read_text())
    assert saved["lora_sha256"] == weights_digest(result.out_dir / BEST_DIR)
    last = generate_pack(result.out_dir, tmp_path / "last",
                         dataclasses.replace(cfg, lora_checkpoint="last"), pipe=pipe,
                         progress=False)
    assert json.loads((last.out_dir / "config.json").read_text())["lora_sha256"] == (
        weights_digest(result.out_dir))
    assert not np.array_equal(np.asarray(pack.images[0]), np.asarray(last.images[0]))
    # The grids offer the last weights and the chosen checkpoint side by side.
    from headshot_kit.generate import default_axis_values

    assert default_axis_values("checkpoint", cfg, [result.out_dir]) == [
        None, result.out_dir, result.out_dir / BEST_DIR]


def test_the_rule_ties_to_the_later_step_and_never_picks_a_step_without_a_face():
    assert step_score([0.7, math.nan]) == pytest.approx(0.35)  # no face counts as 0
    assert math.isnan(step_score([math.nan, math.nan]))
    history = [{"step": 1, "likeness": math.nan}, {"step": 2, "likeness": 0.6},
               {"step": 3}, {"step": 4, "likeness": 0.6}, {"step": 5, "likeness": math.nan}]
    assert choose_best(history)["step"] == 4
    assert choose_best([{"step": 2, "likeness": math.nan}, {"step": 3}]) is None


def test_renders_without_faces_choose_nothing_and_say_so(prepared_dataset, pipe, tmp_path,
                                                         capsys):
    from headshot_kit.generate import generate_pack

    stale = tmp_path / "lora" / BEST_DIR
    stale.mkdir(parents=True)
    (stale / LORA_WEIGHTS).write_bytes(b"an earlier run's")
    result = train_lora(prepared_dataset, tmp_path / "lora", tiny(steps=4), progress=False)
    assert result.best_step is None and not stale.exists()
    assert result.metrics["likeness"].isna().all()
    assert "No checkpoint was chosen by likeness: no validation image showed a face" in (
        result.out_dir / "README.md").read_text()
    cfg = dataclasses.replace(get_preset("tiny").generate, styles=["corporate"], seeds=[0],
                              steps=2)
    generate_pack(result.out_dir, tmp_path / "pack", cfg, pipe=pipe, progress=False)
    assert "last weights (training chose no checkpoint by likeness)" in capsys.readouterr().out


def chosen_pack(samples, folder, chosen_by: str):
    """A pack whose config.json points at a LoRA whose step 4 `chosen_by` chose."""
    lora = folder / "lora" / BEST_DIR
    lora.mkdir(parents=True)
    (lora / "config.json").write_text(json.dumps(
        {"checkpoint": "best", "step": 4, "likeness": 0.7, "chosen_by": chosen_by}))
    pack = folder / "pack"
    (pack / "images").mkdir(parents=True)
    shutil.copy(samples / "obama2.jpg", pack / "images" / "corporate_seed0.jpg")
    pd.DataFrame({"file": ["images/corporate_seed0.jpg"], "style": ["corporate"],
                  "seed": [0]}).to_csv(pack / "manifest.csv", index=False)
    (pack / "config.json").write_text(json.dumps({"lora_dir": str(lora)}))
    return pack


def test_evaluate_says_which_network_chose_and_which_scored(samples, tmp_path, monkeypatch):
    from headshot_kit.evaluate import evaluate_images

    references = [samples / "obama.jpg", samples / "obama3.jpg"]
    pack = chosen_pack(samples, tmp_path / "by-dlib", "dlib-resnet-128")
    alone = evaluate_images(references, pack, tmp_path / "alone",
                            EvaluateConfig(clip_model=""), progress=False)
    note = next(n for n in alone.notes if "was chosen by likeness" in n)
    # Offline, the second network (SFace) scores the pack dlib chose.
    assert "step 4" in note and "scores likeness with sface-2021dec-int8" in note
    assert "flatters" not in note

    # Without it, the one network both chose and scores, and the report says so.
    class Missing(embedders.SFaceEmbedder):
        def __init__(self, cfg):
            raise embedders.EmbedderUnavailable("SFace's model files are missing")

    monkeypatch.setitem(embedders.EMBEDDERS, "sface", Missing)
    monkeypatch.setattr(embedders, "_LOADED_EMBEDDERS", {})
    same = evaluate_images(references, pack, tmp_path / "same",
                           EvaluateConfig(clip_model=""), progress=False)
    note = next(n for n in same.notes if "was chosen by likeness" in n)
    assert "scores likeness with dlib-resnet-128" in note
    assert "same network chose the checkpoint and scores it" in note

    # A second network, loadable offline, first in embedder="auto"'s order: it chose the
    # checkpoint, so the report scores with the other one.
    class OtherNetwork(embedders.DlibEmbedder):
        name = "other-network"

    monkeypatch.setitem(embedders.EMBEDDERS, "arcface", OtherNetwork)
    monkeypatch.setattr(embedders, "_LOADED_EMBEDDERS", {})
    pack = chosen_pack(samples, tmp_path / "by-other", "other-network")
    other = evaluate_images(references, pack, tmp_path / "other",
                            EvaluateConfig(clip_model=""), progress=False)
    assert other.embedder == "dlib-resnet-128"
    note = next(n for n in other.notes if "was chosen by likeness" in n)
    assert "with other-network; this report scores likeness with dlib-resnet-128" in note
    assert "flatters" not in note
    saved = json.loads((tmp_path / "other" / "config.json").read_text())
    assert (saved["checkpoint_chosen_by"], saved["likeness_scored_by"]) == (
        "other-network", "dlib-resnet-128")
    # Where nothing chose, "auto" takes the first network that loads.
    assert embedders.get_embedder(EvaluateConfig(clip_model="")).name == "other-network"
