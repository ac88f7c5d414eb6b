"""The command line builds the same configs as the notebooks, rejects bad settings early, and
runs every stage on the tiny preset and the sample photos."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT
from headshot_kit.cli import _stage_config, build_parser, field_docs, main
from headshot_kit.config import ConfigError, get_preset


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_settings_layer_preset_file_set_and_flags(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("train:\n  rank: 8\n  lr: 0.0002\n")
    args = parse("train", "--data", "d", "--out", "o", "--preset", "sd15-t4", "--config",
                 str(settings), "--set", "lr=1e-4", "--steps", "50")
    cfg = _stage_config(args, "train", {"steps": args.steps})
    assert (cfg.rank, cfg.lr, cfg.steps, cfg.resolution) == (8, 1e-4, 50, 512)


def test_unknown_setting_names_the_valid_ones(tmp_path):
    args = parse("train", "--data", "d", "--out", "o", "--set", "rnak=8")
    with pytest.raises(ConfigError, match="rnak.*valid settings:.*rank"):
        _stage_config(args, "train", {})


def test_bad_value_fails_before_any_work(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set",
                 "rank=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rank" in err and "4 is usual" in err
    assert not (tmp_path / "o").exists()


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--preset", "tiny"]) == 2
    assert "Run the prepare stage first" in capsys.readouterr().err


def test_hub_presets_say_they_need_the_network(prepared_dataset, tmp_path, capsys):
    # On a CPU on purpose (device=cpu): the download is what stops it.
    code = main(["train", "--data", str(prepared_dataset), "--out", str(tmp_path / "o"),
                 "--preset", "sd15-t4", "--set", "device=cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stable-diffusion-v1-5" in err and "network" in err and "tiny" in err


def test_the_readmes_prepare_line_prepares_for_the_real_model(photos, tmp_path, capsys):
    """`headshot-kit prepare --photos DIR --out DIR`, as the README writes it: crops for the
    SD 1.5 preset (512 px), and the first line says so."""
    out = tmp_path / "prepared"
    assert main(["prepare", "--photos", str(photos), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows and all(Image.open(out / r["file_name"]).size == (512, 512) for r in rows)
    assert capsys.readouterr().err.splitlines()[0] == (
        "headshot-kit prepare: preset sd15-t4 (stable-diffusion-v1-5/stable-diffusion-v1-5, "
        "512 px)")


def test_a_gpu_preset_on_a_machine_without_one_is_refused_with_the_way_out(
        prepared_dataset, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--data", str(prepared_dataset), "--out", str(tmp_path / "o")]) == 2
    first, refusal = capsys.readouterr().err.strip().splitlines()
    steps = get_preset("sd15-t4").train.steps
    assert first == ("headshot-kit train: preset sd15-t4 (stable-diffusion-v1-5/"
                     f"stable-diffusion-v1-5, 512 px, {steps} steps)")
    assert "this machine has none" in refusal and "--preset tiny" in refusal
    assert not (tmp_path / "o").exists()
    # The tiny preset names its model too.
    assert main(["train", "--data", str(prepared_dataset), "--out", str(tmp_path / "t"),
                 "--preset", "tiny", "--steps", "2"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "headshot-kit train: preset tiny (tiny-sd15, 64 px, 2 steps)")


def test_help_shows_the_values_of_the_preset_that_runs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    steps = get_preset("sd15-t4").train.steps
    assert "as preset sd15-t4 sets them" in text and f"  steps = {steps} (int)" in text
    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny", "--help"])
    text = capsys.readouterr().out
    assert "  steps = 30 (int)" in text and "  model = 'tiny-sd15' (str)" in text


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "headshot_kit", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("prepare", "train", "generate", "evaluate", "demo"):
        assert command in out


def test_fitcheck_command_prints_a_plan_and_exits_by_verdict(capsys):
    import json

    assert main(["fitcheck", "--preset", "sd15-t4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["gpu"]["key"] == "t4" and plan["total_gb"] < 15
    # A full fine-tune in fp32 Adam at 1024 px without checkpointing cannot fit a T4.
    code = main(["fitcheck", "--preset", "sd15-t4", "--full", "--set", "optimizer=adamw",
                 "--set", "gradient_checkpointing=false", "--set", "resolution=1024"])
    assert code == 1
    assert "Cheapest fix:" in capsys.readouterr().out


def test_training_on_a_dataset_with_every_photo_rejected_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.jsonl").write_text("")
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "lora"),
                 "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    # The line naming the preset, then the one error line.
    assert len(err.splitlines()) == 2 and "every photo was rejected" in err
    assert "report.csv" in err


def test_bitsandbytes_cpu_kernel_notice_is_silenced():
    # bitsandbytes is a declared dependency: a broken install fails the import (check=True).
    code = ("import logging; logging.basicConfig(); import headshot_kit.train; "
            "import bitsandbytes")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert "gemm_4bit_forward" not in run.stderr


def test_an_optional_setting_takes_a_value_by_its_declared_type(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("train:\n  snr_gamma: null\n")
    args = parse("train", "--data", "d", "--out", "o", "--config", str(settings), "--set",
                 "snr_gamma=5.5", "--set", "alpha=8", "--set", "validation_seeds=1,2")
    cfg = _stage_config(args, "train", {})
    assert (cfg.snr_gamma, cfg.alpha, cfg.validation_seeds) == (5.5, 8, (1, 2))
    args = parse("train", "--data", "d", "--out", "o", "--set", "snr_gamma=none")
    assert _stage_config(args, "train", {}).snr_gamma is None
    args = parse("train", "--data", "d", "--out", "o", "--set", "alpha=eight")
    with pytest.raises(ConfigError, match="alpha='eight' is not a valid int"):
        _stage_config(args, "train", {})


def test_a_misspelt_setting_suggests_the_closest_name():
    args = parse("train", "--data", "d", "--out", "o", "--set", "rnak=8")
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        _stage_config(args, "train", {})


@pytest.mark.parametrize("stage", ["prepare", "train", "generate", "evaluate"])
def test_help_documents_every_setting_with_its_config_comment(stage, capsys):
    import dataclasses

    from headshot_kit import config

    cls = {"prepare": config.PrepareConfig, "train": config.TrainConfig,
           "generate": config.GenerateConfig, "evaluate": config.EvaluateConfig}[stage]
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs[f.name], f"{cls.__name__}.{f.name} has no comment saying why"
        assert f"{f.name} = " in text, f.name
        assert " ".join(docs[f.name].split()) in text, f.name
    if stage == "train":
        for name in ("rank", "lr", "snr_gamma"):
            assert docs[name], name
        assert "Min-SNR-gamma loss weighting" in text


# ---------------------------------------------------------------------------------------------
# Each stage's command on the tiny preset and the sample photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory, obama_photos) -> Path:
    """A folder of three photos of one person, as a user's upload folder is."""
    folder = tmp_path_factory.mktemp("photos")
    for photo in obama_photos:
        shutil.copy(photo, folder / photo.name)
    return folder


@pytest.fixture(scope="module")
def headshots(lora_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "headshots"
    # Three seeds and two steps: not the preset's two seeds and four steps.
    code = main(["generate", "--lora", str(lora_dir), "--out", str(out), "--styles",
                 "corporate", "executive", "-n", "3", "--set", "steps=2", "--preset", "tiny"])
    assert code == 0
    return out


def test_prepare_command_writes_a_captioned_dataset(photos, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--photos", str(photos), "--out", str(out), "--preset", "tiny"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a photo of ohwx person"] * 3
    assert all(Image.open(out / r["file_name"]).size == (256, 256) for r in rows)
    assert sorted(pd.read_csv(out / "report.csv")["file"]) == sorted(p.name for p in
                                                                     photos.iterdir())
    assert f"3 photos prepared in {out}" in capsys.readouterr().out


def test_an_empty_photo_folder_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    code = main(["prepare", "--photos", str(tmp_path / "photos"), "--out",
                 str(tmp_path / "out"), "--preset", "tiny"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"headshot-kit prepare: {tmp_path / 'photos'}: no photos there. Put 5-20 photos of the "
        "person in it (JPEG, PNG, HEIC, ... or a .zip), then run this again.")
    assert not (tmp_path / "out").exists()


def test_one_photo_prepared_is_said_in_the_singular(samples, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    shutil.copy(samples / "obama.jpg", tmp_path / "photos")
    assert main(["prepare", "--photos", str(tmp_path / "photos"), "--out",
                 str(tmp_path / "out"), "--preset", "tiny"]) == 0
    assert f"1 photo prepared in {tmp_path / 'out'}" in capsys.readouterr().out


def test_a_missing_lora_is_said_in_the_users_words(tmp_path, capsys):
    code = main(["generate", "--lora", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--preset", "tiny"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not a trained LoRA" in err and "leave the LoRA out" in err
    assert "None" not in err


def test_generate_command_renders_the_chosen_styles_and_seeds(headshots):
    manifest = pd.read_csv(headshots / "manifest.csv")
    assert list(manifest["file"]) == [f"images/{style}_seed{seed}.png" for style in (
        "corporate", "executive") for seed in (0, 1, 2)]
    assert set(manifest["steps"]) == {2} and set(manifest["model"]) == {"tiny-sd15"}
    assert set(manifest["lora"]) == {"ohwx-test0000"}  # the name of its UI file
    assert all(Image.open(headshots / f).size == (64, 64) for f in manifest["file"])
    assert (headshots / "grid.png").is_file() and (headshots / "config.json").is_file()


def test_evaluate_command_scores_every_headshot(headshots, photos, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["evaluate", "--references", str(photos), "--images", str(headshots),
                 "--out", str(out), "--preset", "tiny"]) == 0
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores["image"]) == list(pd.read_csv(headshots / "manifest.csv")["file"])
    assert (out / "summary.csv").is_file()
    # The tiny model draws noise: no face, and the headline says so.
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "0 of 6 look like you")


def test_evaluate_with_no_face_in_the_references_is_one_line(headshots, tmp_path, capsys):
    """References without a face stop evaluate with its one sentence and exit 2, not a
    traceback."""
    refs = tmp_path / "refs"
    refs.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(refs / "noise.png")
    code = main(["evaluate", "--references", str(refs), "--images", str(headshots),
                 "--out", str(tmp_path / "scores"), "--preset", "tiny"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("headshot-kit evaluate: No face was found in any of the 1 reference")
    assert str(refs) in line


def test_purge_lists_with_dry_run_and_deletes_without(photos, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(photos, work / "photos")
    (work / "lora").mkdir()
    (work / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    before = sorted(work.rglob("*"))
    assert main(["purge", "--dry-run", str(work)]) == 0
    assert sorted(work.rglob("*")) == before
    listed = capsys.readouterr().out
    assert f"would delete {len(before) + 1} paths" in listed and "photos/ (3 files)" in listed
    assert main(["purge", str(work)]) == 0
    assert not work.exists() and tmp_path.is_dir()


def test_demo_command_runs_the_four_stages_on_the_bundled_samples(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    # Prepare keeps the three Obama photos and says why it left Biden and the others out.
    report = pd.read_csv(out / "prepared" / "report.csv").set_index("file")
    assert len((out / "prepared" / "metadata.jsonl").read_text().splitlines()) == 3
    assert report.loc["biden.jpg", "status"] == "skipped"
    assert len(pd.read_csv(out / "lora" / "metrics.csv")) == 30
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    manifest = pd.read_csv(out / "headshots" / "manifest.csv")
    assert len(manifest) == 6
    assert list(pd.read_csv(out / "scores" / "scores.csv")["image"]) == list(manifest["file"])
    # The journey's ETA was stated first, and the run wrote its measured phases beside it.
    import json

    eta = json.loads((out / "eta.json").read_text())
    for phase in ("training", "images + face pass", "evaluate"):
        assert eta["phases"][phase]["measured_s"] > 0, phase
        assert eta["phases"][phase]["predicted_s"] > 0, phase
    # A tiny LoRA's checkpoints take hundredths of a second: timed, perhaps rounded to 0.
    assert eta["phases"]["checkpoints"]["measured_s"] is not None
    assert eta["measured_total_s"] > eta["phases"]["training"]["measured_s"]
