"""Nothing lost, nothing run that shouldn't be: checkpoints that carry no code, a run that
knows its photos, one writer per folder, stages that write only their own folders, settings
and files from elsewhere checked before they are used, and failures reported in one line."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from headshot_kit.config import ConfigError, DataError, get_preset
from headshot_kit.lora import LORA_WEIGHTS
from headshot_kit.train import Trainer, latest_checkpoint, train_lora


def tiny(**changes):
    return dataclasses.replace(get_preset("tiny").train, validate_every=0, **changes)


# ---------------------------------------------------------------------------------------------
# Checkpoints


class _CreatesFile:
    """Pickled, this object is a call to open(path, "w"): unpickling it creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _two_checkpoints(data, out):
    """A finished 2-step run with a checkpoint at each step."""
    train_lora(data, out, tiny(steps=2, checkpoint_every=1), progress=False)
    return sorted((out / "checkpoints").glob("checkpoint-*"))


def test_a_crafted_checkpoint_runs_no_code_when_a_run_resumes(prepared_dataset, tmp_path):
    out = tmp_path / "run"
    first, second = _two_checkpoints(prepared_dataset, out)
    # Newest of all, beside a valid meta.json: every state file the loader could read is a
    # pickle that creates a file when unpickled.
    crafted = out / "checkpoints" / "checkpoint-0000003"
    crafted.mkdir()
    meta = json.loads((second / "meta.json").read_text())
    (crafted / "meta.json").write_text(json.dumps({**meta, "step": 3}))
    planted = tmp_path / "planted.txt"
    torch.save(_CreatesFile(planted), crafted / "state.pt")
    for name in ("state.safetensors", "state.json"):
        shutil.copy(crafted / "state.pt", crafted / name)

    resumed = Trainer(prepared_dataset, out, tiny(steps=4, checkpoint_every=1),
                      progress=False)
    assert not planted.exists()
    assert resumed.resumed_from == second and resumed.step == 2


@pytest.mark.parametrize("damage", ["truncated state", "empty meta.json"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_good_one(
        prepared_dataset, tmp_path, capsys, damage):
    out = tmp_path / "run"
    first, second = _two_checkpoints(prepared_dataset, out)
    if damage == "empty meta.json":
        (second / "meta.json").write_text("")
    else:  # cut short, as a full disk or a lost connection leaves a file
        for state in second.glob("state.*"):
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    resumed = Trainer(prepared_dataset, out, tiny(steps=2, checkpoint_every=1),
                      progress=False)
    assert resumed.resumed_from == first and resumed.step == 1
    said = capsys.readouterr().out
    assert str(second) in said and "skipped, resuming from the one before it" in said
    resumed.run()
    assert latest_checkpoint(out / "checkpoints").name == second.name


def test_other_photos_never_finish_an_old_run(prepared_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(steps=2, checkpoint_every=0)
    train_lora(prepared_dataset, out, cfg, progress=False)
    lora, config = (out / LORA_WEIGHTS).read_bytes(), (out / "config.json").read_text()
    # The user replaces a photo (here: the first one, mirrored) and prepares again.
    other = tmp_path / "other-photos"
    shutil.copytree(prepared_dataset, other)
    from PIL import Image, ImageOps

    first = other / json.loads((other / "metadata.jsonl").read_text().splitlines()[0])[
        "file_name"]
    with Image.open(first) as im:
        ImageOps.mirror(im).save(first)
    with pytest.raises(ConfigError, match="trained on other photos.*new out folder"):
        train_lora(other, out, cfg, progress=False)
    assert (out / LORA_WEIGHTS).read_bytes() == lora
    assert (out / "config.json").read_text() == config
    # Started over on purpose (and shorter), the same folder takes the new photos, and the
    # next run continues the new one, not the old one's later checkpoint.
    train_lora(other, out, tiny(steps=1, checkpoint_every=0, resume=False), progress=False)
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(other)
    again = Trainer(other, out, tiny(steps=1, checkpoint_every=0), progress=False)
    assert again.step == 1 and again.resumed_from.name == "checkpoint-0000001"


def test_a_second_training_into_the_same_folder_is_refused_and_harms_nothing(
        prepared_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(steps=4, checkpoint_every=1)
    refusals = []

    def start_another(trainer, record):
        if record["step"] == 2:
            try:
                Trainer(prepared_dataset, out, cfg, progress=False)
            except ConfigError as exc:
                refusals.append(str(exc))

    train_lora(prepared_dataset, out, cfg, progress=False, on_step=start_another)
    assert len(refusals) == 1 and "is in use: another training run" in refusals[0]
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-0000004"
    # Once the first has finished, the folder is free again.
    again = Trainer(prepared_dataset, out, cfg, progress=False)
    assert again.step == 4


# ---------------------------------------------------------------------------------------------
# Packs: their own folder, their stars


@pytest.fixture(scope="module")
def gen_cfg():
    return dataclasses.replace(get_preset("tiny").generate, styles=["corporate"], seeds=[0],
                               steps=2)


@pytest.mark.parametrize("where", ["folder of other files", "work folder"])
def test_generate_never_replaces_a_folder_it_did_not_make(pipe, gen_cfg, tmp_path, where):
    from headshot_kit import generate as gen

    if where == "work folder":  # generate --out pointed at the work folder itself
        out = tmp_path / "work"
        keep = {out / "photos" / "me.jpg": b"a selfie", out / "lora" / LORA_WEIGHTS: b"w"}
    else:
        out = tmp_path / "documents"
        keep = {out / "thesis.docx": b"years of work", out / "sub" / "taxes.pdf": b"2025"}
    for path, data in keep.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with pytest.raises(ConfigError, match=f"out_dir {out} already holds files that are not a "
                       "generated pack"):
        gen.generate_pack(None, out, gen_cfg, pipe=pipe, progress=False)
    assert all(path.read_bytes() == data for path, data in keep.items())
    assert sorted(p.name for p in out.iterdir()) == sorted({p.relative_to(out).parts[0]
                                                            for p in keep})


def test_a_pack_keeps_what_the_user_put_beside_it(pipe, gen_cfg, tmp_path):
    from headshot_kit import generate as gen

    out = tmp_path / "pack"
    gen.generate_pack(None, out, gen_cfg, pipe=pipe, progress=False)
    (out / "notes.txt").write_text("send the second one to HR")
    gen.generate_pack(None, out, dataclasses.replace(gen_cfg, seeds=[0, 1]), pipe=pipe,
                      progress=False)
    assert (out / "notes.txt").read_text() == "send the second one to HR"
    assert (out / "images" / "corporate_seed1.png").is_file()


STAR_WRITER = """
import sys
from headshot_kit.generate import set_starred
out, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(first, first + n):
    set_starred(out, f"images/x{i:03d}.png")
"""


def test_two_writers_of_the_stars_lose_none(tmp_path):
    import subprocess
    import sys

    import pandas as pd

    from headshot_kit.generate import MANIFEST_COLUMNS, load_manifest

    rows = [{c: "" for c in MANIFEST_COLUMNS} | {"file": f"images/x{i:03d}.png",
                                                 "starred": False} for i in range(200)]
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(tmp_path / "manifest.csv", index=False)
    # Two notebooks starring at once: 100 images each.
    writers = [subprocess.Popen([sys.executable, "-c", STAR_WRITER, str(tmp_path), str(first),
                                 "100"]) for first in (0, 100)]
    assert [w.wait(timeout=600) for w in writers] == [0, 0]
    assert int(load_manifest(tmp_path)["starred"].sum()) == 200


def test_a_star_clicked_while_the_pack_is_rewritten_is_kept(pipe, gen_cfg, tmp_path,
                                                            monkeypatch):
    from headshot_kit import generate as gen

    out = tmp_path / "pack"
    gen.generate_pack(None, out, gen_cfg, pipe=pipe, progress=False)
    real = gen.render_batch

    def star_meanwhile(shots, pipe):  # the user stars the first image during the re-run
        gen.set_starred(out, "images/corporate_seed0.png")
        return real(shots, pipe)

    monkeypatch.setattr(gen, "render_batch", star_meanwhile)
    result = gen.generate_pack(None, out, dataclasses.replace(gen_cfg, seeds=[0, 1]),
                               pipe=pipe, progress=False)
    starred = dict(zip(result.manifest["file"], result.manifest["starred"]))
    assert starred == {"images/corporate_seed0.png": True, "images/corporate_seed1.png": False}
    assert gen.load_manifest(out)["starred"].tolist() == [True, False]


def test_an_image_that_comes_out_black_is_flagged_in_the_manifest(pipe, gen_cfg, tmp_path):
    from headshot_kit import generate as gen

    def nan_out(module, args, output):  # NaN from the UNet, as a broken LoRA or fp16 gives
        output[0].fill_(float("nan"))

    hook = pipe.unet.register_forward_hook(nan_out)
    try:
        result = gen.generate_pack(None, tmp_path / "pack", gen_cfg, pipe=pipe, progress=False)
    finally:
        hook.remove()
    assert result.manifest["image_check"].str.startswith("black").all()
    assert gen.load_manifest(tmp_path / "pack")["image_check"].str.startswith("black").all()


# ---------------------------------------------------------------------------------------------
# Purge


def test_purge_deletes_only_folders_the_workbench_made(tmp_path, monkeypatch, capsys):
    from headshot_kit.cli import main
    from headshot_kit.storage import purge

    monkeypatch.chdir(tmp_path / "..")  # the current folder is elsewhere
    documents = tmp_path / "documents"
    (documents / "sub").mkdir(parents=True)
    (documents / "thesis.docx").write_bytes(b"years of work")
    (documents / "sub" / "taxes.pdf").write_bytes(b"2025")
    for path in (documents, documents / "sub", documents / "thesis.docx"):
        assert main(["purge", str(path)]) == 2
        assert "the workbench did not make it" in capsys.readouterr().err
    assert (documents / "thesis.docx").read_bytes() == b"years of work"
    assert (documents / "sub" / "taxes.pdf").read_bytes() == b"2025"
    # The checkout itself, and any folder above it, are refused too.
    from headshot_kit import workspace

    for broad in (workspace.CHECKOUT, workspace.CHECKOUT.parent):
        with pytest.raises(ConfigError, match="Refusing to purge"):
            purge(broad, dry_run=True)
    # A work folder the workbench wrote into goes, uploads included.
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    (work / "photos" / "me.jpg").write_bytes(b"x")
    (work / "lora").mkdir()
    (work / "lora" / LORA_WEIGHTS).write_bytes(b"w")
    assert main(["purge", str(work / "photos")]) == 0 and not (work / "photos").exists()
    assert main(["purge", str(work)]) == 0 and not work.exists()


# ---------------------------------------------------------------------------------------------
# Files made elsewhere: a PNG's settings, a LoRA


def _png_from_elsewhere(path, line: str):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"corporate headshot of ohwx person\nNegative prompt: blurry\n"
                                f"{line}")
    Image.new("RGB", (64, 64), "grey").save(path, pnginfo=info)
    return path


PLAIN = "Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 1, Lora: lora, Lora scale: 1.0"


def test_regenerate_loads_no_model_a_png_names_and_bounds_its_size_and_steps(
        pipe, lora_dir, tmp_path, monkeypatch):
    from headshot_kit import generate as gen

    loaded, rendered = [], []
    monkeypatch.setattr(gen, "load_generate_pipeline",
                        lambda cfg: loaded.append(cfg.model) or pipe)
    monkeypatch.setattr(gen, "render", lambda shot, pipe: rendered.append(shot))
    elsewhere = _png_from_elsewhere(tmp_path / "a.png", f"Steps: 3, Size: 64x64, Model: "
                                    f"{tmp_path / 'downloads' / 'some-model'}, {PLAIN}")
    with pytest.raises(ConfigError, match="names the model .*some-model.*trained on "
                       "'tiny-sd15'"):
        gen.regenerate(gen.read_parameters(elsewhere), lora_dir)
    for line, named in (("Steps: 3, Size: 100000x100000", "size 100000x100000"),
                        ("Steps: 100000, Size: 64x64", "100000 steps")):
        huge = _png_from_elsewhere(tmp_path / "b.png", f"{line}, Model: tiny-sd15, {PLAIN}")
        with pytest.raises(ConfigError, match=named):
            gen.regenerate(gen.read_parameters(huge), lora_dir)
    assert loaded == [] and rendered == []
    # The LoRA's own model, within the limits, renders; another one only when asked for.
    fine = _png_from_elsewhere(tmp_path / "c.png", f"Steps: 3, Size: 64x64, Model: tiny-sd15, "
                               f"{PLAIN}")
    gen.regenerate(gen.read_parameters(fine), lora_dir)
    assert loaded == ["tiny-sd15"] and len(rendered) == 1


def _broken_lora(lora_dir, folder, damage: str):
    """A copy of a good LoRA folder with one kind of damage to its weights file."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(lora_dir, folder)
    path = folder / LORA_WEIGHTS
    if damage == "keys that match nothing":
        state = load_file(str(path))
        # Half of the layers (both their matrices) moved to modules the model does not have.
        modules = sorted({k.split(".lora")[0] for k in state})
        elsewhere = set(modules[::2])
        moved = {k.replace("to_", "to_nowhere_") if k.split(".lora")[0] in elsewhere else k: v
                 for k, v in state.items()}
        assert len(moved) == len(state) and moved.keys() != state.keys()
        save_file(moved, str(path))
    elif damage == "NaN weights":
        state = load_file(str(path))
        first = sorted(k for k in state if "up" in k)[0]
        state[first][0, 0] = float("nan")
        save_file(state, str(path))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a header claiming a petabyte
        path.write_bytes((10 ** 15).to_bytes(8, "little") + b"{" * 64)
    return folder


@pytest.mark.parametrize("damage, said", [
    ("keys that match nothing", "LoRA layers match no layer of the model"),
    ("NaN weights", "holds NaN or inf values"),
    ("truncated", "cut short"),
    ("header bomb", "header claims 1,000,000,000,000,000 bytes")])
def test_a_broken_lora_file_is_refused_in_one_sentence_naming_it(
        pipe, lora_dir, gen_cfg, tmp_path, capsys, damage, said):
    from headshot_kit import generate as gen
    from headshot_kit.cli import main

    broken = _broken_lora(lora_dir, tmp_path / "lora", damage)
    with pytest.raises((ConfigError, DataError), match=said) as refused:
        gen.generate_pack(broken, tmp_path / "pack", gen_cfg, pipe=pipe, progress=False)
    assert str(broken / LORA_WEIGHTS) in str(refused.value)
    assert not (tmp_path / "pack" / "manifest.csv").exists()
    # The command line says it in one line, exit status 2.
    assert main(["generate", "--preset", "tiny", "--lora", str(broken), "--out",
                 str(tmp_path / "cli"), "--set", "styles=corporate", "--set", "seeds=0",
                 "--set", "steps=2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines()
               if line.startswith("headshot-kit") and not _BANNER.search(line)]
    assert said in line and str(broken / LORA_WEIGHTS) in line


# ---------------------------------------------------------------------------------------------
# The command line: one line and exit status 2 for every failure a user can meet


# The line a stage command starts with (which preset runs): not the error line.
_BANNER = re.compile(r"^headshot-kit \w+: preset \S+ \(")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines()
               if line.startswith("headshot-kit") and not _BANNER.search(line)]
    return line


def test_a_full_disk_is_one_line_and_the_old_pack_survives(tmp_path, capsys, monkeypatch):
    import errno

    from headshot_kit import generate as gen
    from headshot_kit.cli import main

    out = tmp_path / "pack"
    args = ["generate", "--preset", "tiny", "--out", str(out), "--set", "styles=corporate",
            "--set", "steps=2"]
    assert main([*args, "--seeds", "0"]) == 0
    before = (out / "manifest.csv").read_text()

    def disk_full(image, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gen, "save_png", disk_full)
    capsys.readouterr()
    assert main([*args, "--seeds", "0", "1"]) == 2
    line = _one_line(capsys)
    assert "the disk is full" in line and "corporate_seed1.png" in line
    assert (out / "manifest.csv").read_text() == before


def test_a_damaged_photo_and_a_diverged_run_are_one_line(prepared_dataset, tmp_path, capsys):
    from headshot_kit.cli import main

    data = tmp_path / "data"
    shutil.copytree(prepared_dataset, data)
    photo = data / json.loads((data / "metadata.jsonl").read_text().splitlines()[1])["file_name"]
    photo.write_bytes(photo.read_bytes()[:100])  # cut short, as an interrupted copy leaves it
    args = ["train", "--preset", "tiny", "--steps", "30", "--set", "validate_every=0",
            "--set", "checkpoint_every=0"]
    assert main([*args, "--data", str(data), "--out", str(tmp_path / "a")]) == 2
    assert photo.name in _one_line(capsys)
    # A learning rate that blows the weights up: the loss turns NaN and the run stops.
    assert main([*args, "--data", str(prepared_dataset), "--out", str(tmp_path / "b"),
                 "--set", "lr=1e30", "--set", "max_bad_steps=2"]) == 2
    assert "The loss was NaN/inf for 2 steps in a row" in _one_line(capsys)


# ---------------------------------------------------------------------------------------------
# Sweeps


def test_a_sweep_refuses_bad_values_at_planning(tmp_path, capsys):
    from headshot_kit.cli import main
    from headshot_kit.sweep import plan_runs

    with pytest.raises(ConfigError, match="--grid lr=nan: TrainConfig.lr is nan"):
        plan_runs("tiny", {"lr": ["nan", "3e-3"]})
    for bad in ("rank=true", "steps=inf", "guidance=nan", "validation_steps=0",
                "resolution=0"):
        with pytest.raises(ConfigError, match=f"--grid {bad}"):
            plan_runs("tiny", {bad.split("=")[0]: [bad.split("=")[1]]})
    assert main(["sweep", "--preset", "tiny", "--data", str(tmp_path), "--out",
                 str(tmp_path / "s"), "--dry-run", "--grid", "lr=nan,3e-3"]) == 2
    assert "lr is nan" in _one_line(capsys)


def test_run_ids_are_safe_folder_names(tmp_path):
    from headshot_kit.sweep import plan_runs

    runs = plan_runs("tiny", {"class_prompt": ["../../../escaped", "a photo of a person"],
                              "rank": ["4"]})
    for run_id, _, _ in runs:
        assert "/" not in run_id and not run_id.startswith(".")
        assert (tmp_path / run_id).resolve().parent == tmp_path.resolve()
    assert len({r[0] for r in runs}) == 2
    # Plain values keep their plain names (finished runs of earlier sweeps are found again).
    assert [r[0] for r in plan_runs("tiny", {"rank": ["4", "16"], "lr": ["1e-4"]})] == [
        "rank=4_lr=0.0001", "rank=16_lr=0.0001"]


def test_a_failed_run_is_reported_while_the_others_run(tmp_path, monkeypatch, capsys):
    from headshot_kit import sweep as sw

    ran = []

    def job(data_dir, out_dir, run, progress=True):
        ran.append(run[0])
        if run[0] == "rank=2":
            raise FileNotFoundError("no such model")
        return None  # finished elsewhere meanwhile: nothing to record

    monkeypatch.setattr(sw, "run_job", job)
    with pytest.raises(sw.SweepError, match=r"1 of 2 runs failed: rank=2 \(FileNotFoundError"):
        sw.sweep(tmp_path / "data", tmp_path / "out", preset="tiny", grid={"rank": ["2", "4"]})
    assert ran == ["rank=2", "rank=4"]
    assert "rank=2 failed: FileNotFoundError: no such model" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Settings: every field's type and range, wherever the value comes from

ABSURD = {
    "TrainConfig": {"lr": [float("nan"), float("inf"), -1.0], "resolution": [0, -8],
                    "steps": [float("inf")], "rank": [True], "model": [{"a": 1}],
                    "target_modules": ["", ()], "validation_steps": [0],
                    "grad_accum": [-1], "lora_dropout": [1.5], "max_grad_norm": [0.0],
                    "noise_offset": [-0.1], "checkpoints_keep": [0],
                    "snr_gamma": [float("nan")], "seed": [-1], "alpha": [0],
                    "validate_every": [-5], "checkpoint_every": [-1],
                    "prior_loss_weight": [float("nan")], "class_image_steps": [0],
                    "max_bad_steps": [0], "gradient_checkpointing": ["yes"]},
    "GenerateConfig": {"guidance": [float("nan")], "steps": [0, 100000],
                       "lora_scale": [float("inf")], "resolution": [0, 100000],
                       "batch_size": [-1], "seeds": [[], [-1]], "styles": ["corporate"],
                       "face_detail_strength": [float("nan")],
                       "face_detail_padding": [float("inf")]},
    "PrepareConfig": {"resolution": [0], "crop_scale": [float("nan")], "token": ["", "two words"],
                      "class_name": [""], "min_photos": [0], "max_file_mb": [0],
                      "detect_upsample": [-1], "identity_warn": [float("nan")]},
    "EvaluateConfig": {"best_n": [0], "detect_max_side": [0], "embedder": [{}]},
}


def test_every_absurd_value_is_refused_when_the_config_is_built():
    from headshot_kit import config

    n = 0
    for cls_name, fields in ABSURD.items():
        cls = getattr(config, cls_name)
        for name, values in fields.items():
            for value in values:
                with pytest.raises(ConfigError, match=f"{cls_name}.{name} is") as refused:
                    dataclasses.replace(cls(), **{name: value})
                assert "\n" not in str(refused.value)
                n += 1
    assert n >= 27


def test_bad_values_from_set_and_yaml_stop_before_any_model_loads(prepared_dataset, tmp_path,
                                                                  capsys, monkeypatch):
    from headshot_kit import models
    from headshot_kit.cli import main

    loaded = []

    def load_pipeline(*args, **kwargs):
        loaded.append(args)
        raise RuntimeError("a model was loaded")

    monkeypatch.setattr(models, "load_pipeline", load_pipeline)
    train = ["train", "--preset", "tiny", "--data", str(prepared_dataset), "--out",
             str(tmp_path / "lora")]
    for bad in ("lr=nan", "resolution=0", "target_modules=", "validation_steps=0",
                "snr_gamma=nan", "rank=-2"):
        assert main([*train, "--set", bad]) == 2, bad
        assert f"TrainConfig.{bad.split('=')[0]} is" in _one_line(capsys)
    for yaml_text, named in (("steps: .inf", "steps"), ("rank: true", "rank"),
                             ("model: {a: 1}", "model"), ("lr: .nan", "lr"),
                             ("target_modules: []", "target_modules")):
        settings = tmp_path / "settings.yaml"
        settings.write_text(f"train:\n  {yaml_text}\n")
        assert main([*train, "--config", str(settings)]) == 2, yaml_text
        assert f"TrainConfig.{named} is" in _one_line(capsys)
    assert main(["generate", "--preset", "tiny", "--out", str(tmp_path / "pack"), "--set",
                 "guidance=nan"]) == 2
    assert "GenerateConfig.guidance is nan" in _one_line(capsys)
    assert loaded == []


# ---------------------------------------------------------------------------------------------
# A class noun of several words


def test_a_class_noun_of_two_words_goes_through_every_stage(obama_photos, tmp_path, pipe,
                                                            gen_cfg):
    from headshot_kit import generate as gen
    from headshot_kit.prepare import prepare_photos

    prep = dataclasses.replace(get_preset("tiny").prepare, class_name="young man")
    prepare_photos(obama_photos, tmp_path / "data", prep)
    trainer = Trainer(tmp_path / "data", tmp_path / "lora", tiny(steps=2, checkpoint_every=0),
                      progress=False)
    assert trainer.cfg.subject == "ohwx young man"
    assert trainer.cfg.class_prompt == "a photo of a young man"
    trainer.run()
    trainer.close()
    pack = gen.generate_pack(tmp_path / "lora", tmp_path / "pack", gen_cfg, pipe=pipe,
                             progress=False)
    assert "ohwx young man" in pack.manifest.loc[0, "prompt"]


@pytest.mark.parametrize("stage", ["train", "--preset", "tiny", "evaluate"])
def test_train_and_evaluate_never_write_over_a_folder_of_other_files(
        prepared_dataset, tmp_path, stage):
    from headshot_kit.evaluate import evaluate_images

    out = tmp_path / "documents"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "README.md").write_text("my notes")
    with pytest.raises(ConfigError, match=f"out_dir {out} already holds files"):
        if stage == "train":
            train_lora(prepared_dataset, out, tiny(steps=1), progress=False)
        else:
            evaluate_images(prepared_dataset / "images", prepared_dataset / "images", out)
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert (out / "README.md").read_text() == "my notes"


def test_a_damaged_record_of_a_lora_is_one_line_naming_it(lora_dir, tmp_path, capsys):
    from headshot_kit.cli import main

    lora = tmp_path / "lora"
    shutil.copytree(lora_dir, lora)
    (lora / "config.json").write_text('{"family": "sd15", "mod')  # cut short
    assert main(["generate", "--preset", "tiny", "--lora", str(lora), "--out",
                 str(tmp_path / "pack")]) == 2
    line = _one_line(capsys)
    assert str(lora / "config.json") in line and "damaged" in line
