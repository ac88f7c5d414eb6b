"""The generate stage on the tiny models: packs, PNG metadata, determinism, LoRA effect, grids,
SDXL, and LoRAs refused on a model they were not trained on."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from conftest import grid_of_single_renders, make_lora, text_overflows
from test_facedetail import photo_as_first_render, sample_render

from headshot_kit import generate as gen
from headshot_kit.evaluate import best_of
from headshot_kit.config import ConfigError, get_preset


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(get_preset("tiny").generate, styles=["corporate", "executive"],
                               seeds=[0, 1], steps=3)


@pytest.fixture(scope="module")
def pack(pipe, lora_dir, cfg, tmp_path_factory) -> gen.GenerateResult:
    return gen.generate_pack(lora_dir, tmp_path_factory.mktemp("pack") / "out", cfg, pipe=pipe,
                             progress=False)


def test_packaged_styles():
    styles = gen.load_styles()
    assert len(styles) >= 12
    assert "navy background, business attire, soft directional lighting" in styles[
        "corporate"].prompt
    assert "sage green background" in styles["creative"].prompt
    assert "black background, formal attire, dramatic studio lighting" in styles[
        "executive"].prompt
    for style in styles.values():
        assert "{subject}" in style.prompt and style.negative_prompt
        assert style.guidance > 0 and style.steps > 0


def test_pack_writes_images_manifest_grid_and_config(pack, cfg, lora_dir):
    out = pack.out_dir
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns) == gen.MANIFEST_COLUMNS
    assert list(manifest["file"]) == ["images/corporate_seed0.png", "images/corporate_seed1.png",
                                      "images/executive_seed0.png", "images/executive_seed1.png"]
    assert not manifest["starred"].any()
    assert set(manifest["lora"]) == {"ohwx-test0000"} and set(manifest["steps"]) == {3}
    assert manifest.loc[0, "prompt"].startswith("corporate headshot of ohwx person")
    for file, image in zip(manifest["file"], pack.images):
        assert (pixels(gen.Image.open(out / file)) == pixels(image)).all()
        assert image.size == (64, 64)
    # The grid is 2 styles x 2 seeds of 192 px cells plus the label margins.
    grid = gen.Image.open(out / "grid.png")
    assert grid.size == pack.grid.size
    assert 2 * 192 < grid.width < 3 * 192 and 2 * 192 < grid.height < 3 * 192
    # The title wraps to the sheet's width instead of running off it; labels stay apart.
    assert text_overflows(grid, 2) == []
    saved = json.loads((out / "config.json").read_text())
    assert saved["config_type"] == "GenerateConfig" and saved["steps"] == 3
    assert saved["lora_dir"] == str(lora_dir.resolve())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp folder left"


def test_a_narrow_grids_title_wraps_instead_of_running_off(pipe, lora_dir, cfg, tmp_path):
    """One seed makes grid.png one cell wide; its title (the settings held fixed) is longer
    than that and wraps onto more lines instead of being cut at the sheet's edge."""
    narrow = dataclasses.replace(cfg, styles=["corporate"], seeds=[0])
    pack = gen.generate_pack(lora_dir, tmp_path / "pack", narrow, pipe=pipe, progress=False)
    title = gen.describe_shot(gen.make_shot(narrow, gen.load_styles()["corporate"], 0, lora_dir),
                              skip=("style", "seed"))
    from headshot_kit.images import font

    assert font(192 // 11).getlength(title) > pack.grid.width  # too long for one line
    assert text_overflows(gen.Image.open(pack.out_dir / "grid.png"), 1) == []


def tiny_model_hash() -> str:
    """The tiny model's "Model hash", by hand: it has no single checkpoint file, so the sha256
    over its weight files (path, then the file's own sha256, in path order)."""
    import hashlib

    from headshot_kit.models import ensure_tiny_model

    folder = ensure_tiny_model("tiny-sd15")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()[:10]


def lora_file_hash(lora_dir) -> str:
    """A1111's hash of the LoRA's UI file, by hand: sha256 of what follows the 8-byte header
    length and the header, 12 hex digits."""
    import hashlib

    data = (lora_dir / "ohwx-test0000.safetensors").read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_png_parameters_round_trip(pack, lora_dir):
    row = pack.manifest.iloc[3]
    text = gen.Image.open(pack.out_dir / row["file"]).info["parameters"]
    prompt, negative, line = text.split("\n")
    # The LoRA as A1111 names it in a prompt: its UI file's name and the scale.
    assert prompt == f"{row['prompt']} <lora:ohwx-test0000:1.0>"
    assert negative == f"Negative prompt: {row['negative_prompt']}"
    assert line == ("Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 1, Size: 64x64, "
                    f"Model hash: {tiny_model_hash()}, Model: tiny-sd15, "
                    f'Lora hashes: "ohwx-test0000: {lora_file_hash(lora_dir)}"')
    params = gen.read_parameters(pack.out_dir / row["file"])
    assert params == {k: row[k] for k in params}
    assert params["seed"] == 1 and params["scheduler"] == "dpmpp-karras"


def test_read_parameters_quotes_awkward_values(tmp_path, cfg):
    style = gen.Style("mine", "a {subject}, with: commas")
    shot = gen.make_shot(dataclasses.replace(cfg, model="C:/models, mine"), style, 7, None)
    gen.save_png(gen.Image.new("RGB", (8, 8)), tmp_path / "x.png", shot)
    params = gen.read_parameters(tmp_path / "x.png")
    assert params["model"] == "C:/models, mine" and params["prompt"] == shot.prompt
    assert params["lora"] == "" and params["negative_prompt"] == ""
    gen.Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="plain.png"):
        gen.read_parameters(tmp_path / "plain.png")


def test_regenerate_gives_identical_pixels(pack, pipe, lora_dir):
    manifest = gen.load_manifest(pack.out_dir)
    # Render something else first: the result must not depend on what ran before.
    gen.render(dataclasses.replace(gen.shot_from_row(manifest.iloc[0], lora_dir), seed=99,
                                   scheduler="euler-a"), pipe)
    again = gen.regenerate(manifest.iloc[3], lora_dir, pipe=pipe)
    assert (pixels(again) == pixels(pack.images[3])).all()
    # The PNG alone is enough to get the picture back.
    from_png = gen.regenerate(gen.read_parameters(pack.out_dir / manifest.loc[2, "file"]),
                              lora_dir, pipe=pipe)
    assert (pixels(from_png) == pixels(pack.images[2])).all()
    with pytest.raises(ValueError, match="pass its folder"):
        gen.regenerate(manifest.iloc[0], None, pipe=pipe)


def test_a_ddim_shot_is_the_same_whatever_sampler_ran_before(lora_dir, cfg):
    from headshot_kit.models import load_pipeline

    fresh = load_pipeline("tiny-sd15")  # still holding the model's own scheduler
    style = gen.load_styles()["corporate"]
    ddim = gen.make_shot(dataclasses.replace(cfg, scheduler="ddim"), style, 0, lora_dir)
    first = gen.render(ddim, fresh)
    gen.render(dataclasses.replace(ddim, scheduler="euler-a"), fresh)
    assert (pixels(gen.render(ddim, fresh)) == pixels(first)).all()


def test_lora_changes_the_image_and_scale_zero_is_the_base_model(pack, pipe, lora_dir, cfg,
                                                                 tmp_path):
    base = gen.generate_pack(None, tmp_path / "base", cfg, pipe=pipe, progress=False)
    assert set(base.manifest["lora"]) == {""}
    text = gen.Image.open(base.out_dir / "images/corporate_seed0.png").info["parameters"]
    assert "Lora" not in text and "<lora:" not in text and text.endswith("Model: tiny-sd15")
    params = gen.read_parameters(base.out_dir / "images/corporate_seed0.png")
    assert params == {k: base.manifest.loc[0, k] for k in params}
    for with_lora, without in zip(pack.images, base.images):
        assert np.abs(pixels(with_lora) - pixels(without)).mean() > 5
    row = base.manifest.iloc[1]
    zero = gen.render(dataclasses.replace(gen.shot_from_row(row, None), lora_dir=str(lora_dir),
                                          lora_scale=0.0), pipe)
    assert (pixels(zero) == pixels(base.images[1])).all()


@pytest.mark.parametrize("text, field", [
    ("mine:\n  prompt: a photo of {subject}\n  guidance: high\n", "'guidance'"),
    ("mine:\n  prompt: a photo of a person\n", "'prompt'"),
    ("mine:\n  prompt: a photo of {subject}\n  colour: red\n", "'colour'"),
    ("Mine Style:\n  prompt: a photo of {subject}\n", "name"),
])
def test_bad_style_file_names_file_and_field(tmp_path, text, field):
    (tmp_path / "studio.yaml").write_text(text)
    with pytest.raises(gen.StyleError) as err:
        gen.load_styles([tmp_path])
    assert "studio.yaml" in str(err.value) and field in str(err.value)


def test_user_styles_are_added_and_replace_packaged_ones(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "mine:\n  prompt: a photo of {subject}, orange background\n  steps: 12\n"
        "corporate:\n  prompt: my corporate {subject}\n")
    styles = gen.load_styles([tmp_path])
    assert styles["mine"].steps == 12 and styles["corporate"].prompt == "my corporate {subject}"
    assert styles["mine"].source.endswith("mine.yaml")


def test_style_settings_and_negative_prompt_override(cfg):
    style = gen.load_styles()["executive"]
    plain = gen.make_shot(cfg, style, 0, None)
    assert (plain.steps, plain.guidance) == (cfg.steps, cfg.guidance)
    suggested = gen.make_shot(dataclasses.replace(cfg, style_settings=True,
                                                  negative_prompt="hats"), style, 0, None)
    assert (suggested.steps, suggested.guidance) == (style.steps, style.guidance)
    assert suggested.negative_prompt == "hats"


def test_bad_settings_fail_before_rendering(cfg, tmp_path, lora_dir):
    with pytest.raises(ConfigError, match="scheduler"):
        gen.generate_pack(None, tmp_path / "x", dataclasses.replace(cfg, scheduler="plms"))
    with pytest.raises(ConfigError, match="nosuch"):
        gen.generate_pack(None, tmp_path / "x", dataclasses.replace(cfg, styles=["nosuch"]))
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        gen.generate_pack(tmp_path, tmp_path / "x", cfg)
    with pytest.raises(ConfigError, match="family"):
        gen.check_lora(lora_dir, dataclasses.replace(cfg, family="sdxl"))
    for bad, named in (({"face_detail_strength": 0.0}, "redraws nothing"),
                       ({"face_detail_strength": 1.5}, "from 0 \\(off\\) to 1"),
                       ({"face_detail_padding": -0.1}, "face_detail_padding is -0.1")):
        with pytest.raises(ConfigError, match=named):
            gen.generate_pack(None, tmp_path / "x",
                              dataclasses.replace(cfg, face_detail=True, **bad))
    assert not (tmp_path / "x").exists()


def test_a_lora_is_refused_on_another_base_model_of_its_family(pipe, lora_dir, cfg, tmp_path,
                                                              monkeypatch):
    rendered = []
    monkeypatch.setattr(gen, "render_batch", lambda shots, pipe: rendered.extend(shots))
    other = dataclasses.replace(cfg, model="other/sd15-model")  # recorded: tiny-sd15
    refusal = (r"trained on 'tiny-sd15' but GenerateConfig.model is 'other/sd15-model'; "
               r"set model='tiny-sd15', or other_base_model=True")
    with pytest.raises(ConfigError, match=refusal):
        gen.generate_pack(lora_dir, tmp_path / "pack", other, pipe=pipe, progress=False)
    with pytest.raises(ConfigError, match=refusal):
        gen.plan_compare(lora_dir, "seed", [0], "style", None, other)
    assert rendered == [] and not (tmp_path / "pack").exists()
    assert gen.check_lora(lora_dir, cfg) == lora_dir  # the model it was trained on
    on_purpose = dataclasses.replace(other, other_base_model=True)
    assert gen.check_lora(lora_dir, on_purpose) == lora_dir


def test_a_tiny_sdxl_pack_is_written_and_regenerates_pixel_for_pixel(tmp_path):
    from headshot_kit.models import load_pipeline

    sdxl = load_pipeline("tiny-sdxl", "sdxl")
    lora = make_lora(sdxl, tmp_path / "lora")
    cfg = dataclasses.replace(get_preset("tiny").generate, model="tiny-sdxl", family="sdxl",
                              styles=["corporate"], seeds=[0, 1], steps=3)
    pack = gen.generate_pack(lora, tmp_path / "pack", cfg, pipe=sdxl, progress=False)
    manifest = gen.load_manifest(pack.out_dir)
    assert list(manifest["file"]) == ["images/corporate_seed0.png", "images/corporate_seed1.png"]
    assert set(manifest["family"]) == {"sdxl"} and set(manifest["model"]) == {"tiny-sdxl"}
    assert (pack.out_dir / "grid.png").is_file()
    assert all(gen.Image.open(pack.out_dir / f).size == (64, 64) for f in manifest["file"])
    # The row alone is enough: regenerate loads the SDXL pipeline it names.
    assert (pixels(gen.regenerate(manifest.iloc[1], lora)) == pixels(pack.images[1])).all()
    base = gen.render(dataclasses.replace(gen.shot_from_row(manifest.iloc[1], lora),
                                          lora_scale=0.0), sdxl)
    assert np.abs(pixels(base) - pixels(pack.images[1])).mean() > 2  # the LoRA was applied


def test_interrupted_pack_keeps_the_previous_one(pack, pipe, lora_dir, cfg, monkeypatch):
    before = (pack.out_dir / "manifest.csv").read_text()
    real_render, calls = gen.render_batch, []

    def failing_render(shots, pipe):
        calls.append(shots)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a user pressing stop looks like
        return real_render(shots, pipe)

    monkeypatch.setattr(gen, "render_batch", failing_render)
    with pytest.raises(KeyboardInterrupt):  # another guidance: every image is rendered again
        gen.generate_pack(lora_dir, pack.out_dir, dataclasses.replace(cfg, guidance=5.0),
                          pipe=pipe, progress=False)
    assert (pack.out_dir / "manifest.csv").read_text() == before
    assert sorted(p.name for p in pack.out_dir.parent.iterdir()) == [pack.out_dir.name]


def test_compare_grid_lays_out_the_chosen_axes(pipe, lora_dir, cfg):
    plan = gen.plan_compare(lora_dir, "lora_scale", ["0", "1"], "scheduler",
                            ["ddim", "euler-a", "dpmpp-karras"], cfg)
    assert plan.col_labels == ["LoRA scale 0", "LoRA scale 1"]
    assert plan.row_labels == ["DDIM", "Euler a", "DPM++ 2M Karras"]
    assert plan.title == "corporate, seed 0, 3 steps, CFG 7, LoRA ohwx-test0000"
    assert [(s.scheduler, s.lora_scale) for s in plan.shots[:3]] == [
        ("ddim", 0.0), ("ddim", 1.0), ("euler-a", 0.0)]
    grid = gen.render_plan(plan, pipe, progress=False)
    # Each cell is its shot rendered alone, whichever sampler rendered before it.
    assert (pixels(grid) == pixels(grid_of_single_renders(plan, pipe))).all()
    with pytest.raises(ConfigError, match="different"):
        gen.plan_compare(lora_dir, "seed", [0], "seed", [1], cfg)
    with pytest.raises(ConfigError, match="checkpoint"):
        gen.plan_compare([lora_dir, lora_dir], "seed", [0], "style", None, cfg)


def test_base_vs_lora_grid_over_checkpoints(pipe, lora_dir, cfg, pack, tmp_path):
    plan = gen.plan_compare(lora_dir, "seed", [0, 1], "checkpoint", [None, lora_dir], cfg)
    assert plan.row_labels == ["base model", "lora"] and plan.col_labels == ["seed 0", "seed 1"]
    assert [s.lora_dir for s in plan.shots] == [None, None, str(lora_dir), str(lora_dir)]
    assert "LoRA x1" in plan.title
    grid = gen.base_vs_lora_grid(lora_dir, cfg, pipe=pipe, progress=False)
    assert (pixels(grid) == pixels(grid_of_single_renders(plan, pipe))).all()
    # The LoRA row is the pack's first style, seeds 0 and 1, as generate_pack drew them.
    assert np.array_equal(np.stack([pixels(gen.render(s, pipe)) for s in plan.shots[2:]]),
                          np.stack([pixels(im) for im in pack.images[:2]]))
    # Two runs' checkpoints with the same folder name are told apart by their run folder.
    other = make_lora(pipe, tmp_path / "run2" / "lora", seed=1)
    plan = gen.plan_compare([lora_dir, other], "seed", [0], "checkpoint", None, cfg)
    assert plan.row_labels == ["base model", f"{lora_dir.parent.name}/lora", "run2/lora"]


def test_base_vs_lora_grid_renders_the_packs_checkpoint_and_checks_the_model(
        pipe, lora_dir, cfg, tmp_path, monkeypatch):
    """The LoRA row of base_vs_lora_grid is the checkpoint the pack renders (best/, where
    training chose one), and a LoRA trained on another base model is refused there too."""
    import shutil

    from headshot_kit.lora import BEST_DIR

    run = tmp_path / "lora"
    shutil.copytree(lora_dir, run)
    make_lora(pipe, run / BEST_DIR, seed=5)
    (run / BEST_DIR / "config.json").write_text(json.dumps(
        {"family": "sd15", "model": "tiny-sd15", "checkpoint": "best", "step": 4,
         "likeness": 0.7, "chosen_by": "dlib-resnet-128"}))
    drawn = []
    monkeypatch.setattr(gen.grids, "render",
                        lambda shot, pipe: drawn.append(shot) or Image.new("RGB", (8, 8)))
    gen.base_vs_lora_grid(run, cfg, seeds=[0], pipe=pipe, progress=False)
    pack_uses = gen.check_lora(run, cfg)
    assert pack_uses == run / BEST_DIR
    assert [s.lora_dir for s in drawn] == [None, str(pack_uses)]
    # On the axis, a folder typed by hand renders its own weights: last and best side by side.
    plan = gen.plan_compare(run, "seed", [0], "checkpoint", None, cfg)
    assert [s.lora_dir for s in plan.shots] == [None, str(run), str(run / BEST_DIR)]
    other = dataclasses.replace(cfg, model="other/sd15-model")
    with pytest.raises(ConfigError, match="trained on 'tiny-sd15' but GenerateConfig.model"):
        gen.base_vs_lora_grid(run, other, seeds=[0], pipe=pipe, progress=False)
    with pytest.raises(ConfigError, match="trained on 'tiny-sd15' but GenerateConfig.model"):
        gen.plan_compare(None, "seed", [0], "checkpoint", ["base", str(run)], other)


def test_best_of_takes_top_scores_with_a_face(pack, tmp_path):
    scores = pd.DataFrame({
        "image": list(pack.manifest["file"]), "face_found": [True, False, True, True],
        "likeness": [0.5, 0.99, 0.9, None]})
    best = best_of(scores, pack.out_dir, k=2)
    assert list(best["image"]) == ["images/executive_seed0.png", "images/corporate_seed0.png"]
    assert sorted(p.name for p in (pack.out_dir / "best").iterdir()) == [
        "01_executive_seed0.png", "02_corporate_seed0.png", "best.csv"]
    with pytest.raises(ValueError, match="likeness"):
        best_of(pack.manifest, pack.out_dir)


def test_batched_pack_matches_one_image_at_a_time(pack, pipe, lora_dir, cfg, tmp_path):
    batched = gen.generate_pack(lora_dir, tmp_path / "batched",
                                dataclasses.replace(cfg, batch_size=2), pipe=pipe,
                                progress=False)
    assert gen.pick_batch_size(dataclasses.replace(cfg, batch_size=0), pipe) == 1  # CPU
    assert list(batched.manifest["file"]) == list(pack.manifest["file"])
    for one, two in zip(pack.images, batched.images):
        assert np.abs(pixels(one) - pixels(two)).max() <= 1


def test_regenerating_keeps_stars_picks_and_unchanged_images(pipe, lora_dir, cfg, tmp_path,
                                                             monkeypatch, capsys):
    out = tmp_path / "pack"
    first = gen.generate_pack(lora_dir, out, cfg, pipe=pipe, progress=False)
    gen.set_starred(out, "images/corporate_seed1.png")
    gen.export_starred(out)
    best_of(first.manifest.assign(likeness=[0.1, 0.9, 0.5, 0.3]), out, k=2)
    rendered = []
    real_render = gen.render_batch
    monkeypatch.setattr(gen, "render_batch",
                        lambda shots, pipe: rendered.extend(shots) or real_render(shots, pipe))
    # One more seed: only its images are rendered; the rest, and the user's picks, stay.
    again = gen.generate_pack(lora_dir, out, dataclasses.replace(cfg, seeds=[0, 1, 2]),
                              pipe=pipe, progress=False)
    assert sorted((s.style, s.seed) for s in rendered) == [("corporate", 2), ("executive", 2)]
    starred = again.manifest.set_index("file")["starred"]
    assert starred["images/corporate_seed1.png"] and starred.sum() == 1
    assert (out / "favourites" / "01_corporate_seed1.png").is_file()
    assert (out / "best" / "best.csv").is_file()
    capsys.readouterr()
    # Other seeds: the starred picture is left out; its star goes, and one line says so.
    gen.set_starred(out, "images/executive_seed0.png")
    fewer = dataclasses.replace(cfg, seeds=[0])
    again = gen.generate_pack(lora_dir, out, fewer, pipe=pipe, progress=False)
    assert again.manifest.set_index("file")["starred"].to_dict() == {
        "images/corporate_seed0.png": False, "images/executive_seed0.png": True}
    said = capsys.readouterr().out
    assert ("1 starred image released (corporate_seed1.png): their settings changed or they "
            "are no longer in the pack" in said)
    # Nothing to render is said as such, not as "0 to render, on a T4 GPU under a minute".
    assert said.startswith("2 images (2 styles x 1 seed) with ") and "0 to render" not in said
    assert "kept, with their stars; nothing to render." in said
    changed = dataclasses.replace(cfg, guidance=cfg.guidance + 1)
    gen.generate_pack(lora_dir, out, changed, pipe=pipe, progress=False)
    assert "1 starred image released (executive_seed0.png)" in capsys.readouterr().out
    gen.set_starred(out, "images/corporate_seed1.png")
    # New LoRA weights: every image is rendered again, and no star survives on a new picture.
    rendered.clear()
    other = make_lora(pipe, tmp_path / "other" / "lora", seed=3)
    again = gen.generate_pack(other, out, changed, pipe=pipe, progress=False)
    assert len(rendered) == 4 and not again.manifest["starred"].any()
    said = capsys.readouterr().out
    assert ("1 starred image released (corporate_seed1.png): the LoRA's weights changed, so "
            "the new pictures start unstarred. favourites/ keeps the copies exported before."
            in said)
    assert (out / "favourites" / "01_corporate_seed1.png").is_file()


def test_a_pack_whose_record_is_damaged_is_rendered_again_in_full(pipe, lora_dir, cfg,
                                                                   tmp_path, monkeypatch):
    """A config.json cut short, holding something else than a record, or not text at all
    tells nothing about which images the same settings made: all are rendered again, and the
    record is written anew."""
    out = tmp_path / "pack"
    gen.generate_pack(lora_dir, out, cfg, pipe=pipe, progress=False)
    rendered = []
    real_render = gen.render_batch
    monkeypatch.setattr(gen, "render_batch",
                        lambda shots, pipe: rendered.extend(shots) or real_render(shots, pipe))
    for damage in (b'{"lora_sha256": "ab', b"[]", b"\xff\xfe\x00"):
        (out / "config.json").write_bytes(damage)
        rendered.clear()
        again = gen.generate_pack(lora_dir, out, cfg, pipe=pipe, progress=False)
        assert len(rendered) == len(again.manifest) == 4, damage
        assert json.loads((out / "config.json").read_text())["config_type"] == "GenerateConfig"


def test_a_token_set_at_prepare_reaches_every_prompt(tmp_path, obama_photos, pipe):
    from headshot_kit.prepare import prepare_photos
    from headshot_kit.train import train_lora

    preset = get_preset("tiny")
    prepare_photos(obama_photos, tmp_path / "prepared",
                   dataclasses.replace(preset.prepare, token="zqx"))
    train_lora(tmp_path / "prepared", tmp_path / "lora", preset.train, progress=False)
    trained = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert trained["subject"] == "zqx person" and trained["token"] == "zqx"
    assert "`zqx person`" in (tmp_path / "lora" / "README.md").read_text()
    pack = gen.generate_pack(tmp_path / "lora", tmp_path / "pack", preset.generate, pipe=pipe,
                             progress=False)
    assert all("zqx person" in p and "ohwx" not in p for p in pack.manifest["prompt"])
    plan = gen.plan_compare(tmp_path / "lora", "seed", [0], "style", None, preset.generate)
    assert all("zqx person" in s.prompt for s in plan.shots)
    with pytest.raises(ConfigError, match="GenerateConfig.token is 'ohwx'.*'zqx'"):
        gen.generate_pack(tmp_path / "lora", tmp_path / "pack2",
                          dataclasses.replace(preset.generate, token="ohwx"), pipe=pipe)


def test_t4_presets_plan_at_least_40_headshots_and_say_how_long(capsys):
    for name in ("sd15-t4", "sdxl-t4"):
        cfg = get_preset(name).generate
        n = len(gen.check_generate(cfg, gen.load_styles())) * len(cfg.seeds)
        assert n >= 40, name
        assert "on a T4 GPU about" in gen.t4_estimate(cfg, n)
        assert cfg.face_detail, f"{name}: a real model's faces get the face-detail pass"
        # The T4 presets sample 20 steps (the promise's budget); the face pass redraws at
        # strength 0.4: 8 more.
        assert "20 steps + 8 for the face pass each" in gen.t4_estimate(cfg, n)
    assert not get_preset("tiny").generate.face_detail  # the tiny model draws no face
    assert not gen.GenerateConfig().face_detail


# ---------------------------------------------------------------------------------------------
# The face-detail pass in the generate stage. The tiny model draws no face, so these tests make
# a real photo every shot's first render (the pass itself runs as it would on a GPU).


@pytest.fixture(scope="module")
def photo(samples):
    return sample_render(samples)


@pytest.fixture
def detail_cfg(cfg):
    return dataclasses.replace(cfg, face_detail=True, styles=["corporate"])


def test_the_face_detail_pass_reaches_the_manifest_the_png_and_regenerate(
        pipe, lora_dir, detail_cfg, photo, monkeypatch, tmp_path):
    photo_as_first_render(monkeypatch, photo)
    pack = gen.generate_pack(lora_dir, tmp_path / "pack", detail_cfg, pipe=pipe,
                             progress=False)
    row = pack.manifest.iloc[1]
    assert (row["face_detail_strength"], row["face_detail_padding"]) == (0.4, 0.35)
    assert list(pack.manifest["face_detail_note"]) == ["1 face redrawn"] * 2
    # The pass redrew the face of the first render; the two seeds redrew it differently.
    assert np.abs(pixels(pack.images[1]) - pixels(photo)).mean() > 1
    assert (pixels(pack.images[0]) != pixels(pack.images[1])).any()
    png = pack.out_dir / row["file"]
    assert (pixels(gen.Image.open(png)) == pixels(pack.images[1])).all()
    line = gen.Image.open(png).info["parameters"].split("\n")[-1]
    # ADetailer 25's keys with the detector a user would pick to repeat the pass, and ours.
    assert line.endswith("ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, "
                         "ADetailer dilate erode: 4, ADetailer mask blur: 4, "
                         "ADetailer inpaint only masked: True, ADetailer inpaint padding: 32, "
                         "ADetailer method to decide top k masks: Area, "
                         "ADetailer mask only top k: 4, ADetailer denoising strength: 0.4, "
                         "ADetailer version: 25.3.0, Face detail detector: yunet-2023mar-int8, "
                         "Face detail padding: 0.35, Face detail feather: 0.12, "
                         "Face detail: 1 face redrawn")
    params = gen.read_parameters(png)
    assert params == {k: row[k] for k in params}
    # The manifest row, or the PNG alone, gives the final image back; an image with another
    # sampler rendered in between must not leak into the pass.
    other = gen.render(dataclasses.replace(gen.shot_from_row(row, lora_dir),
                                           scheduler="euler-a"), pipe)
    assert (pixels(other) != pixels(pack.images[1])).any()
    assert (pixels(gen.regenerate(row, lora_dir, pipe=pipe)) == pixels(pack.images[1])).all()
    assert (pixels(gen.regenerate(params, lora_dir, pipe=pipe)) == pixels(pack.images[1])).all()
    # The pass draws with the LoRA at the shot's scale.
    unscaled = gen.render(dataclasses.replace(gen.shot_from_row(row, lora_dir), lora_scale=0.0),
                          pipe)
    assert (pixels(unscaled) != pixels(pack.images[1])).any()


def test_the_tiny_models_own_renders_have_no_face_and_the_manifest_says_so(
        pipe, detail_cfg, tmp_path):
    pack = gen.generate_pack(None, tmp_path / "pack", dataclasses.replace(detail_cfg, seeds=[0]),
                             pipe=pipe, progress=False)
    row = pack.manifest.iloc[0]
    assert row["face_detail_note"] == "no face found: image as rendered"
    assert row["face_detail_strength"] == 0.4
    assert gen.read_parameters(pack.out_dir / row["file"])["face_detail_note"] == row[
        "face_detail_note"]
    plain = gen.render(dataclasses.replace(gen.shot_from_row(row, None),
                                           face_detail_strength=0.0), pipe)
    assert (pixels(plain) == pixels(pack.images[0])).all()


def test_switching_the_face_pass_re_renders_and_keeps_unchanged_images(
        pipe, cfg, tmp_path, monkeypatch):
    out, rendered = tmp_path / "pack", []
    real_render = gen.render_batch
    monkeypatch.setattr(gen, "render_batch",
                        lambda shots, pipe: rendered.extend(shots) or real_render(shots, pipe))

    def run(**changes):
        rendered.clear()
        result = gen.generate_pack(None, out, dataclasses.replace(cfg, styles=["corporate"],
                                                                  **changes),
                                   pipe=pipe, progress=False)
        return sorted(s.seed for s in rendered), result.manifest.set_index("seed")

    assert run()[0] == [0, 1]
    gen.set_starred(out, "images/corporate_seed1.png")
    # A padding with the pass off decides nothing: no image changes, the star stays.
    seeds, manifest = run(face_detail_padding=0.5)
    assert seeds == [] and manifest["starred"][1]
    assert set(manifest["face_detail_note"]) == {""}
    # Switched on: every image is new, and no star survives on a new picture.
    seeds, manifest = run(face_detail=True)
    assert seeds == [0, 1] and not manifest["starred"].any()
    gen.set_starred(out, "images/corporate_seed0.png")
    # One more seed with the pass still on: only it renders; the rest keep star and note.
    seeds, manifest = run(face_detail=True, seeds=[0, 1, 2])
    assert seeds == [2] and list(manifest["starred"]) == [True, False, False]
    assert set(manifest["face_detail_note"]) == {"no face found: image as rendered"}
    # Switched off again: rendered again.
    assert run()[0] == [0, 1]


def test_compare_grid_over_the_face_detail_axis(pipe, lora_dir, cfg, photo, monkeypatch):
    photo_as_first_render(monkeypatch, photo)
    plan = gen.plan_compare(lora_dir, "face_detail", ["off", "on", "1"], "seed", [0], cfg)
    assert plan.col_labels == ["face detail off", "face detail 0.4", "face detail 1"]
    assert [(s.face_detail_strength, s.face_detail_padding) for s in plan.shots] == [
        (0.0, 0.0), (0.4, 0.35), (1.0, 0.35)]
    assert "face detail" not in plan.title
    singles = [gen.render(shot, pipe) for shot in plan.shots]
    assert (pixels(singles[0]) == pixels(photo)).all()  # off: the first render as it was
    assert (pixels(singles[1]) != pixels(photo)).any()
    assert (pixels(singles[1]) != pixels(singles[2])).any()
    grid = gen.render_plan(plan, pipe, progress=False)
    assert (pixels(grid) == pixels(plan.grid(singles))).all()
    # With the pass on in cfg, other grids name it in their title.
    on = gen.plan_compare(lora_dir, "seed", [0], "steps", [3], dataclasses.replace(
        cfg, face_detail=True))
    assert on.title.endswith("face detail 0.4")
    for bad in ("1.5", "x"):
        with pytest.raises(ConfigError, match="face_detail value"):
            gen.plan_compare(lora_dir, "face_detail", [bad], "seed", [0], cfg)


def test_a_sweep_grid_switches_the_face_pass_on_and_off():
    from headshot_kit.sweep import parse_grid, plan_runs

    runs = plan_runs("tiny", parse_grid(["face_detail=true,false"]))
    assert [r[0] for r in runs] == ["face_detail=True", "face_detail=False"]
    assert [r[2].generate.face_detail for r in runs] == [True, False]
