"""The notebook widgets driven from Python: set values, click, check what they made."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_facedetail import photo_as_first_render, sample_render

from headshot_kit import generate as gen
from headshot_kit.config import get_preset
from headshot_kit.images import image_grid
from headshot_kit.widgets import ComparePanel, Gallery, PromptStudio, enable_colab_widgets

from conftest import grid_of_single_renders


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(get_preset("tiny").generate, styles=["corporate", "creative"],
                               seeds=[0, 1], steps=2)


def test_prompt_studio_generates_from_its_controls(pipe, lora_dir, cfg):
    studio = PromptStudio(lora_dir, cfg, pipe=pipe, keep=2)
    assert studio._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
    studio.style.value = "creative"
    assert "sage green background" in studio.prompt.value
    studio.seed.value, studio.count.value, studio.lora_scale.value = 5, 2, 0.5
    studio.scheduler.value = "ddim"
    studio.generate_button.click()
    images = studio.history[0][1]
    assert len(images) == 2 and images[0].size == (64, 64)
    assert studio.progress.value == studio.progress.max == 2
    # The images are exactly what the same settings give through the library.
    style = gen.load_styles()["creative"]
    shot = gen.make_shot(cfg, style, 6, lora_dir, steps=2, lora_scale=0.5, scheduler="ddim")
    assert (np.asarray(gen.render(shot, pipe)) == np.asarray(images[1])).all()
    assert studio.history[0][0] == "1. creative, seeds 5-6"

    old_seed = studio.seed.value
    studio.dice.click()
    studio.count.value = 1
    studio.generate_button.click()
    studio.generate_button.click()
    assert studio.seed.value != old_seed
    # keep=2: the oldest run has scrolled away; the grid shows 2 rows x 1 column, each row
    # numbered so two runs of one style and seed are told apart.
    assert [label for label, _ in studio.history] == [f"{n}. creative, seed {studio.seed.value}"
                                                      for n in (3, 2)]
    title = "Newest first: " + gen.describe_shot(studio.shots()[0], ("style", "seed"))
    assert studio.grid.size == image_grid(images[:2], 2, 1, title=title,
                                          row_labels=[label for label, _ in studio.history]).size
    assert not studio.generate_button.disabled


def test_prompt_studio_shows_its_grid_labels_own_prompts_and_keeps_a_render(
        pipe, lora_dir, cfg, tmp_path):
    """The history grid is the panel's output (its widget state, what the page shows); a prompt
    of your own is labelled as such, not with the style's name; Keep saves the newest run with
    its settings in each PNG."""
    import base64
    import io

    studio = PromptStudio(lora_dir, cfg, pipe=pipe, out_dir=tmp_path / "studio")
    assert studio.keep_button.disabled  # nothing to keep yet
    studio.count.value = 1
    studio.generate()
    [shown] = studio.output.outputs
    picture = Image.open(io.BytesIO(base64.b64decode(shown["data"]["image/png"])))
    assert (np.asarray(picture.convert("RGB")) == np.asarray(studio.grid)).all()
    studio.prompt.value = "a photo of {subject} on a beach"
    studio.generate()
    assert [label for label, _ in studio.history] == ["2. own prompt, seed 0",
                                                      "1. corporate, seed 0"]
    studio.keep_button.click()
    [kept] = (tmp_path / "studio").iterdir()
    assert kept.name == "corporate_seed0.png"
    settings = gen.read_parameters(kept)
    assert "on a beach" in settings["prompt"]
    assert (np.asarray(gen.regenerate(settings, lora_dir, pipe=pipe))
            == np.asarray(studio.history[0][1][0])).all()
    studio.keep_last()  # again: a new name, nothing overwritten
    assert len(list((tmp_path / "studio").iterdir())) == 2
    assert studio.status.value == f"Kept 1 image in {tmp_path / 'studio'}."


def test_prompt_studio_without_subject_warns(pipe, cfg):
    studio = PromptStudio(None, cfg, pipe=pipe)
    assert studio.lora_scale.disabled
    studio.prompt.value, studio.count.value = "a photo of a lighthouse", 1
    studio.generate()
    assert "{subject}" in studio.status.value


def test_compare_panel_renders_the_chosen_axes(pipe, lora_dir, cfg):
    panel = ComparePanel(lora_dir, cfg, pipe=pipe)
    panel.y_axis.value = "scheduler"
    assert panel.y_values.value == "dpmpp-karras, euler-a, ddim"
    panel.x_axis.value, panel.x_values.value = "lora_scale", "0, 1"
    panel.y_axis.value, panel.y_values.value = "seed", "3\n4, 5"
    panel.render_button.click()
    assert panel.plan.col_labels == ["LoRA scale 0", "LoRA scale 1"]
    assert panel.plan.row_labels == ["seed 3", "seed 4", "seed 5"]
    assert panel.plan.title == "corporate, 2 steps, CFG 7, DPM++ 2M Karras, LoRA ohwx-test0000"
    assert panel.progress.value == 6
    assert [(s.seed, s.lora_scale, s.steps) for s in panel.plan.shots[:3]] == [
        (3, 0.0, 2), (3, 1.0, 2), (4, 0.0, 2)]
    expected = grid_of_single_renders(panel.plan, pipe)
    assert (np.asarray(panel.grid) == np.asarray(expected)).all()


def test_prompt_studio_face_detail_switch_changes_what_it_renders(pipe, lora_dir, cfg, samples,
                                                                  monkeypatch):
    photo = sample_render(samples)
    photo_as_first_render(monkeypatch, photo)  # the tiny model draws no face to redraw
    studio = PromptStudio(lora_dir, cfg, pipe=pipe)
    studio.count.value = 1
    assert not studio.face_detail.value and studio.face_detail_strength.disabled
    assert [s.face_detail_strength for s in studio.shots()] == [0.0]
    assert (np.asarray(studio.generate()[0]) == np.asarray(photo)).all()
    studio.face_detail.value = True
    assert not studio.face_detail_strength.disabled
    # 2 steps x 0.3 rounds down to no img2img step; the pass still runs one.
    studio.face_detail_strength.value = 0.3
    (shot,) = studio.shots()
    assert (shot.face_detail_strength, shot.face_detail_padding) == (0.3, 0.35)
    redrawn = studio.generate()[0]
    assert (np.asarray(redrawn) != np.asarray(photo)).any()
    assert (np.asarray(redrawn) == np.asarray(gen.render(shot, pipe))).all()


def test_compare_panel_over_the_face_detail_axis(pipe, lora_dir, cfg, samples, monkeypatch):
    photo = sample_render(samples)
    photo_as_first_render(monkeypatch, photo)
    panel = ComparePanel(lora_dir, cfg, pipe=pipe)
    panel.x_axis.value = "face_detail"
    assert panel.x_values.value == "off, 0.4"
    panel.y_axis.value, panel.y_values.value = "seed", "0"
    panel.render_button.click()
    assert panel.plan.col_labels == ["face detail off", "face detail 0.4"]
    # Each cell is the picture its shot gives alone; off is the first render untouched.
    for shot, image in zip(panel.plan.shots, panel.images, strict=True):
        assert (np.asarray(gen.render(shot, pipe)) == np.asarray(image)).all()
    assert (np.asarray(panel.images[0]) == np.asarray(photo)).all()
    assert (np.asarray(panel.images[1]) != np.asarray(photo)).any()


def test_a_typo_in_the_compare_values_is_one_line_in_the_panel(pipe, lora_dir, cfg):
    panel = ComparePanel(lora_dir, cfg, pipe=pipe)
    panel.y_axis.value = "seed"
    # A grid drawn first: the panel's output holds it, and the typo replaces it with its line.
    panel.x_axis.value, panel.x_values.value = "lora_scale", "0, 1"
    panel.render_button.click()
    assert [o["output_type"] for o in panel.output.outputs] == ["display_data"]
    panel.x_axis.value, panel.x_values.value = "lora_scale", "0, 1x"
    panel.render_button.click()
    assert [o["text"] for o in panel.output.outputs] == [
        "lora_scale value '1x' is not a number.\n"]
    assert not panel.render_button.disabled


def test_gallery_stars_are_saved_and_exported(pipe, lora_dir, cfg, tmp_path):
    out = tmp_path / "pack"
    gen.generate_pack(lora_dir, out, cfg, pipe=pipe, progress=False)
    gallery = Gallery(out)
    assert len(gallery.grid.children) == 4
    gallery.star("images/creative_seed1.png")
    gallery.stars["images/corporate_seed0.png"].value = True
    gallery.star("images/corporate_seed0.png", False)
    saved = pd.read_csv(out / "manifest.csv")
    assert list(saved.loc[saved["starred"], "file"]) == ["images/creative_seed1.png"]
    # A starred card says so and stands out; an unstarred one is plain again.
    assert gallery.stars["images/creative_seed1.png"].description == "Starred"
    assert "#f0ad4e" in gallery.cards["images/creative_seed1.png"].layout.border
    assert gallery.stars["images/corporate_seed0.png"].description == "Star"
    assert "transparent" in gallery.cards["images/corporate_seed0.png"].layout.border
    gallery.starred_only.value = True
    assert gallery.visible() == ["images/creative_seed1.png"]
    assert len(gallery.grid.children) == 1
    gallery.export_button.click()
    assert sorted(p.name for p in (out / "favourites").iterdir()) == [
        "01_creative_seed1.png", "favourites.csv"]
    # A fresh gallery reads the stars back from the manifest.
    assert Gallery(out).stars["images/creative_seed1.png"].value


def test_enable_colab_widgets_is_a_no_op_off_colab():
    assert enable_colab_widgets() is False


def test_photo_upload_saves_without_overwriting(tmp_path, samples):
    from headshot_kit.widgets import PhotoUpload

    panel = PhotoUpload(tmp_path / "me")
    photo = (samples / "obama.jpg").read_bytes()

    def upload(name):  # what the browser sends for one picked file
        return ({"name": name, "type": "image/jpeg", "size": len(photo),
                 "last_modified": datetime.now(timezone.utc), "content": memoryview(photo)},)

    panel.picker.set_trait("value", upload("../obama.jpg"))
    assert "Saved 1 photo to" in panel.status.value
    other = photo
    photo = (samples / "obama2.jpg").read_bytes()  # another photo under a name already taken
    panel.picker.set_trait("value", upload("obama.jpg"))
    names = sorted(p.name for p in (tmp_path / "me").iterdir())
    assert names == ["obama-1.jpg", "obama.jpg"]  # kept inside the folder, never overwritten
    assert (tmp_path / "me" / "obama.jpg").read_bytes() == other
    assert "Saved 1 photo" in panel.status.value


def test_the_same_photo_uploaded_again_is_not_saved_twice(tmp_path, samples):
    """A second copy (obama-1.jpg) would be rejected by prepare as a duplicate of the first."""
    from headshot_kit.widgets import PhotoUpload

    panel = PhotoUpload(tmp_path / "me")
    photo = (samples / "obama.jpg").read_bytes()
    item = {"name": "obama.jpg", "type": "image/jpeg", "size": len(photo),
            "last_modified": datetime.now(timezone.utc), "content": memoryview(photo)}
    panel.picker.set_trait("value", (item,))
    panel.picker.set_trait("value", ({**item, "name": "IMG_0001.jpg"},))
    assert sorted(p.name for p in (tmp_path / "me").iterdir()) == ["obama.jpg"]
    assert panel.status.value == (f"Saved 0 photos to {tmp_path / 'me'}. 1 photo already there "
                                  "with the same content, not saved again: IMG_0001.jpg.")


def test_an_upload_with_the_default_settings_leaves_git_status_clean(samples, monkeypatch):
    import shutil
    import subprocess

    from conftest import ROOT
    from headshot_kit.widgets import PhotoUpload
    from headshot_kit.workspace import DRIVE_ENV, workspace

    monkeypatch.delenv(DRIVE_ENV, raising=False)  # a local checkout, not Colab
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def status():
        return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout

    before = status()
    photos = workspace().photos  # the upload cell's folder when nothing is set
    created = not photos.exists()
    had = set(photos.iterdir()) if photos.exists() else set()
    panel = PhotoUpload(photos)
    photo = (samples / "obama.jpg").read_bytes()
    panel.picker.set_trait("value", ({"name": "my_selfie.jpg", "type": "image/jpeg",
                                      "size": len(photo), "content": memoryview(photo),
                                      "last_modified": datetime.now(timezone.utc)},))
    saved = set(photos.iterdir()) - had
    try:
        assert len(saved) == 1 and next(iter(saved)).is_relative_to(ROOT)
        assert status() == before
    finally:
        for path in saved:
            path.unlink()
        if created:
            shutil.rmtree(photos, ignore_errors=True)


def test_training_monitor_draws_loss_and_validation():
    from types import SimpleNamespace

    from headshot_kit.widgets import TrainingMonitor

    monitor = TrainingMonitor(every=2)
    trainer = SimpleNamespace(cfg=SimpleNamespace(steps=4), history=[])
    assert monitor.loss.layout.display == "none"  # no broken image before the first plot
    for step, loss in enumerate([1.0, 0.9, float("nan"), 0.8], 1):
        trainer.history.append({"step": step, "loss": loss, "lr": 1e-3})
        monitor.on_step(trainer, trainer.history[-1])
    assert monitor.loss.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert monitor.loss.layout.display != "none"
    assert "finished: step 4 of 4" in monitor.status.value
    monitor.on_validation(trainer, 4, [], image_grid([Image.new("RGB", (8, 8))], 1, 1))
    assert monitor.validation.value[:4] == b"\x89PNG"
