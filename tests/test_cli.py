"""The command line builds the same configs as the notebooks and rejects bad settings early."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from headshot_kit.cli import _stage_config, build_parser, main
from headshot_kit.config import ConfigError


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
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "Run the prepare stage first" in capsys.readouterr().err


def test_hub_presets_say_they_need_the_network(prepared_dataset, tmp_path, capsys):
    code = main(["train", "--data", str(prepared_dataset), "--out", str(tmp_path / "o"),
                 "--preset", "sd15-t4"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stable-diffusion-v1-5" in err and "network" in err and "tiny" in err


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
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every photo was rejected" in err
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
    docs = config.field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs[f.name], f"{cls.__name__}.{f.name} has no comment saying why"
        assert f"{f.name} = " in text, f.name
        assert " ".join(docs[f.name].split()) in text, f.name
    if stage == "train":
        for name in ("rank", "lr", "snr_gamma"):
            assert docs[name], name
        assert "Min-SNR-gamma loss weighting" in text
