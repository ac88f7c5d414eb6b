"""Notebook widgets: upload photos, watch training, try prompts, compare settings, pick
favourites.

Each panel is a small class holding its child widgets as attributes, a `.widget` to display
(the object displays itself too), and plain methods the buttons call (`generate()`, `render()`,
`star()`, `export()`), so the same actions can be driven from code and from tests. Rendering runs
in the button handler; an `ipywidgets.Output` and a progress bar show how far it has got, and an
error appears in the panel's output rather than vanishing into the widget log.
"""

from __future__ import annotations

import io
import math
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as w
from PIL import Image

from .config import ConfigError, GenerateConfig
from .generate import (AXES, SAMPLERS, ComparePlan, Shot, check_lora, default_axis_values,
                       describe_shot, export_starred, load_generate_pipeline, load_manifest,
                       load_styles, make_shot, parse_axis_values, plan_compare, render,
                       save_png, set_starred, with_lora_subject)
from .images import image_grid, load_image
from .workspace import enable_colab_widgets  # noqa: F401


def widget_mimebundle(widget: w.Widget) -> dict:
    """What a notebook shows for `widget`, under ipywidgets 8 (`_repr_mimebundle_`) and 7.x
    (Colab's and Kaggle's 7.7.1, which display through `_ipython_display_` and build the same
    widget-view bundle there)."""
    if hasattr(widget, "_repr_mimebundle_"):
        return widget._repr_mimebundle_()
    plaintext = repr(widget)
    bundle = {"text/plain": plaintext[:110] + "…" if len(plaintext) > 110 else plaintext}
    if widget._view_name is not None:
        bundle["application/vnd.jupyter.widget-view+json"] = {
            "version_major": 2, "version_minor": 0, "model_id": widget._model_id}
    return bundle


class _Panel:
    """Shared display plumbing: an object that shows its `.widget`."""

    widget: w.Widget

    def _repr_mimebundle_(self, **kwargs: Any):
        return widget_mimebundle(self.widget)


def _seeds_label(shots: Sequence[Shot]) -> str:
    seeds = [s.seed for s in shots]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


class PromptStudio(_Panel):
    """Try a style or your own prompt with the LoRA; the last few runs stay on screen, and
    *Keep* saves the newest run's images (with their settings in each PNG) into `out_dir`. With
    `references` (the prepared photos), each new image's likeness is shown under the grid."""

    def __init__(self, lora_dir: str | Path | None, cfg: GenerateConfig | None = None,
                 pipe=None, keep: int = 4, out_dir: str | Path | None = None,
                 references: str | Path | None = None):
        cfg = cfg or GenerateConfig()
        # Beside the LoRA in its work folder (<workdir>/studio), never inside the LoRA's folder.
        self.out_dir = Path(out_dir) if out_dir else (
            Path(lora_dir).parent / "studio" if lora_dir else Path("studio"))
        self.runs = 0  # numbers the history's rows, so two runs of one style differ
        self.last: list[tuple[Shot, Image.Image]] = []  # the newest run: what Keep saves
        # The LoRA's weights cfg.lora_checkpoint names (its best checkpoint by default).
        self.lora_dir = check_lora(lora_dir, cfg)
        self.cfg = with_lora_subject(cfg, self.lora_dir)
        self.pipe = pipe
        self.keep = keep
        self.styles = load_styles(self.cfg.style_dirs)
        # Each run: a row label and its images, newest first.
        self.history: list[tuple[str, list[Image.Image]]] = []
        self.grid: Image.Image | None = None
        self.references, self._scorer = references, None
        # The last run's likeness labels, one per image (empty without references).
        self.likeness: list[str] = []
        first = (self.cfg.styles or list(self.styles))[0]
        wide = w.Layout(width="95%")
        self.style = w.Dropdown(
            options=[(f"{s.name}: {s.description}" if s.description else s.name, s.name)
                     for s in self.styles.values()], value=first, description="Style",
            layout=wide)
        self.prompt = w.Textarea(description="Prompt", layout=wide, rows=3,
                                 placeholder="{subject} is replaced by the trained words")
        self.negative = w.Textarea(description="Negative", layout=wide, rows=2)
        self.seed = w.IntText(value=self.cfg.seeds[0], description="Seed")
        self.dice = w.Button(description="", icon="dice", tooltip="Pick a random seed",
                             layout=w.Layout(width="44px"))
        self.count = w.IntSlider(value=2, min=1, max=8, description="Images")
        self.steps = w.IntSlider(value=self.cfg.steps, min=1, max=max(100, self.cfg.steps),
                                 description="Steps")
        self.guidance = w.FloatSlider(value=self.cfg.guidance, min=1.0, max=15.0, step=0.5,
                                      description="CFG")
        self.lora_scale = w.FloatSlider(value=self.cfg.lora_scale, min=0.0, max=1.5, step=0.05,
                                        description="LoRA scale", disabled=lora_dir is None)
        self.scheduler = w.Dropdown(options=[(v.a1111, k) for k, v in SAMPLERS.items()],
                                    value=self.cfg.scheduler, description="Sampler")
        # The face-detail pass: a second, full-resolution render of each face.
        self.face_detail = w.Checkbox(value=self.cfg.face_detail, description="Face detail",
                                      tooltip="Redraw each face at the model's resolution")
        self.face_detail_strength = w.FloatSlider(
            value=self.cfg.face_detail_strength, min=0.0, max=1.0, step=0.05,
            description="Face strength", disabled=not self.cfg.face_detail,
            style={"description_width": "initial"})  # the default width cuts the name
        self.keep_button = w.Button(description="Keep", icon="save", disabled=True,
                                    tooltip="Save the newest run's images, settings included")
        self.generate_button = w.Button(description="Generate", icon="play",
                                        button_style="primary")
        self.progress = w.IntProgress(value=0, min=0, max=1)
        self.status = w.Label()
        self.output = w.Output()
        self.widget = w.VBox([
            self.style, self.prompt, self.negative,
            w.HBox([self.seed, self.dice, self.count]),
            w.HBox([self.steps, self.guidance]), w.HBox([self.lora_scale, self.scheduler]),
            w.HBox([self.face_detail, self.face_detail_strength]),
            w.HBox([self.generate_button, self.keep_button, self.progress, self.status]),
            self.output])
        self.style.observe(lambda change: self.apply_style(change["new"]), names="value")
        self.dice.on_click(lambda _: self.roll_dice())
        self.face_detail.observe(
            lambda change: setattr(self.face_detail_strength, "disabled", not change["new"]),
            names="value")
        self.generate_button.on_click(self._on_generate)
        self.keep_button.on_click(lambda _: self.keep_last())
        self.apply_style(first)

    def apply_style(self, name: str) -> None:
        """Fill the prompt fields (and, with cfg.style_settings, steps and CFG) from a style."""
        shot = make_shot(self.cfg, self.styles[name], 0, None)
        self.prompt.value = self.styles[name].prompt
        self.negative.value = shot.negative_prompt
        if self.cfg.style_settings:
            self.steps.value, self.guidance.value = shot.steps, shot.guidance

    def roll_dice(self) -> int:
        self.seed.value = random.randrange(2**31)
        return self.seed.value

    def shots(self) -> list[Shot]:
        """The shots the current settings describe: `count` consecutive seeds."""
        return [make_shot(self.cfg, self.styles[self.style.value], self.seed.value + i,
                          self.lora_dir, prompt=self.prompt.value,
                          negative_prompt=self.negative.value, steps=self.steps.value,
                          guidance=self.guidance.value, scheduler=self.scheduler.value,
                          lora_scale=self.lora_scale.value if self.lora_dir else 0.0,
                          face_detail_strength=self.face_detail_strength.value
                          if self.face_detail.value else 0.0)
                for i in range(self.count.value)]

    def generate(self) -> list[Image.Image]:
        """Render the current settings, add them to the history and show the history grid."""
        shots = self.shots()
        if self.pipe is None:
            self.status.value = "Loading the model..."
            self.pipe = load_generate_pipeline(self.cfg)
        self.progress.max, self.progress.value = len(shots), 0
        images = []
        for shot in shots:
            self.status.value = f"{len(images)}/{len(shots)}"
            images.append(render(shot, self.pipe))
            self.progress.value = len(images)
        self.runs += 1
        # A prompt of your own is not the style's: say so, and number every run.
        own = self.prompt.value.strip() != self.styles[self.style.value].prompt.strip()
        label = f"{self.runs}. {'own prompt' if own else shots[0].style}, {_seeds_label(shots)}"
        self.history = [(label, images), *self.history][: self.keep]
        self.last = list(zip(shots, images))
        self.keep_button.disabled = False
        self.status.value = "" if "{subject}" in self.prompt.value else (
            "The prompt has no {subject}: the trained face may not appear.")
        self.likeness = self._likeness(images)
        if self.likeness:
            self.status.value = " ".join(
                [self.status.value, "Newest:", "; ".join(self.likeness)]).strip()
        cols = max(len(imgs) for _, imgs in self.history)
        cells = [im for _, imgs in self.history for im in imgs + [_blank()] * (cols - len(imgs))]
        self.grid = image_grid(cells, len(self.history), cols,
                               row_labels=[label for label, _ in self.history],
                               title="Newest first: " + describe_shot(shots[0], ("style", "seed")))
        _show_in(self.output, self.grid)
        return images

    def keep_last(self) -> list[Path]:
        """Save the newest run's images into out_dir, each PNG with its settings (as the pack's
        are, so `regenerate` can make it again); a name already taken gets a number."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        for shot, image in self.last:
            target, n = self.out_dir / f"{shot.style}_seed{shot.seed}.png", 1
            while target.exists():
                target, n = self.out_dir / f"{shot.style}_seed{shot.seed}-{n}.png", n + 1
            kept.append(save_png(image, target, shot))
        if kept:
            self.status.value = f"Kept {len(kept)} image{'s' * (len(kept) > 1)} in {self.out_dir}."
        return kept

    def _likeness(self, images: list[Image.Image]) -> list[str]:
        """Each image's likeness label, by the network that did not choose the checkpoint."""
        if self.references is None:
            return []
        if self._scorer is None:
            from .evaluate.band import LikenessScorer
            from .lora import chosen_checkpoint

            chooser = chosen_checkpoint(self.lora_dir).get("chosen_by") if self.lora_dir else None
            self._scorer = LikenessScorer(self.references, avoid=chooser)
        return [self._scorer.label(image) for image in images]

    def _on_generate(self, _button: w.Button) -> None:
        self.generate_button.disabled = True
        try:
            # Inside the Output, an error shows its traceback in the panel.
            with self.output, _one_line_errors(self.output):
                self.generate()
        finally:
            self.generate_button.disabled = False


def _blank() -> Image.Image:
    return Image.new("RGB", (8, 8), (240, 240, 240))


class ComparePanel(_Panel):
    """Pick two settings and their values; render the X/Y grid of every combination."""

    def __init__(self, lora_dir_or_dirs: str | Path | Sequence[str | Path] | None,
                 cfg: GenerateConfig | None = None, pipe=None):
        self.cfg = cfg or GenerateConfig()
        self.lora_dirs = lora_dir_or_dirs
        self.pipe = pipe
        self.plan: ComparePlan | None = None
        # The last grid and its cells, in the plan's order.
        self.images: list[Image.Image] = []
        self.grid: Image.Image | None = None
        several = isinstance(lora_dir_or_dirs, (list, tuple)) and len(lora_dir_or_dirs) > 1
        self.x_axis = w.Dropdown(options=AXES, value="seed", description="X axis")
        self.y_axis = w.Dropdown(options=AXES, description="Y axis",
                                 value="checkpoint" if several else "lora_scale")
        hint = ("comma separated; prompts one per line; 'base' = no LoRA; face_detail: "
                "strengths, 'off' or 'on'")
        self.x_values = w.Textarea(description="X values", placeholder=hint, rows=2,
                                   layout=w.Layout(width="95%"))
        self.y_values = w.Textarea(description="Y values", placeholder=hint, rows=2,
                                   layout=w.Layout(width="95%"))
        self.render_button = w.Button(description="Render grid", icon="th",
                                      button_style="primary")
        self.progress = w.IntProgress(value=0, min=0, max=1)
        self.output = w.Output()
        self.widget = w.VBox([w.HBox([self.x_axis, self.y_axis]), self.x_values, self.y_values,
                              w.HBox([self.render_button, self.progress]), self.output])
        self.x_axis.observe(lambda c: self._fill(self.x_values, c["new"]), names="value")
        self.y_axis.observe(lambda c: self._fill(self.y_values, c["new"]), names="value")
        self.render_button.on_click(self._on_render)
        self._fill(self.x_values, self.x_axis.value)
        self._fill(self.y_values, self.y_axis.value)

    def _fill(self, box: w.Textarea, axis: str) -> None:
        dirs = self.lora_dirs if isinstance(self.lora_dirs, (list, tuple)) else (
            [self.lora_dirs] if self.lora_dirs is not None else [])
        values = default_axis_values(axis, self.cfg, dirs)
        if axis == "checkpoint":
            values = ["base" if v is None else str(v) for v in values]
        if axis == "face_detail":
            values = [v if v else "off" for v in values]
        box.value = ("\n" if axis == "prompt" else ", ").join(str(v) for v in values)

    def render(self) -> Image.Image:
        """Render the grid the axes and values describe; the plan keeps its labels."""
        x, y = self.x_axis.value, self.y_axis.value
        self.plan = plan_compare(self.lora_dirs, x, parse_axis_values(x, self.x_values.value),
                                 y, parse_axis_values(y, self.y_values.value), self.cfg)
        if self.pipe is None:
            self.pipe = load_generate_pipeline(self.cfg)
        self.progress.max, self.progress.value = len(self.plan.shots), 0
        self.images = []
        for shot in self.plan.shots:
            self.images.append(render(shot, self.pipe))
            self.progress.value = len(self.images)
        self.grid = self.plan.grid(self.images)
        _show_in(self.output, self.grid)
        return self.grid

    def _on_render(self, _button: w.Button) -> None:
        self.render_button.disabled = True
        try:
            with self.output, _one_line_errors(self.output):
                self.render()
        finally:
            self.render_button.disabled = False


@contextmanager
def _one_line_errors(output: w.Output):
    """A mistake in a panel's fields (a typo in a value, an unknown style) replaces the panel's
    picture with the sentence saying what to change; anything else shows its traceback."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as exc:
        output.outputs = ({"output_type": "stream", "name": "stderr", "text": f"{exc}\n"},)


def _show_in(output: w.Output, image: Image.Image) -> None:
    """Make `image` the panel output's one picture.

    Set through the widget's `outputs`, as the error line is, and not printed inside `with
    output:`: that way goes through the front end, which sends its own copy of the outputs
    back later and could overwrite a message set here meanwhile (a typo after a drawn grid
    showed a blank panel)."""
    import base64

    png = base64.b64encode(_png_bytes(image)).decode("ascii")
    output.outputs = ({"output_type": "display_data", "metadata": {},
                       "data": {"image/png": png,
                                "text/plain": f"<image {image.width}x{image.height}>"}},)


def _thumbnail_png(path: Path, side: int = 192) -> bytes:
    with Image.open(path) as im:
        thumb = im.convert("RGB")
    # Upscale the tiny model's 64 px images too, so every pack browses at the same size.
    return _png_bytes(thumb.resize((side, side * thumb.height // thumb.width),
                                   Image.Resampling.LANCZOS))


class Gallery(_Panel):
    """Browse a generated pack, star favourites (saved in manifest.csv) and export them.

    With `references` (the prepared photos), each card says how much its face looks like
    them and where it falls against their band (evaluate.band.LikenessScorer)."""

    def __init__(self, out_dir: str | Path, columns: int = 4,
                 references: str | Path | None = None):
        self.out_dir = Path(out_dir)
        self.manifest = load_manifest(self.out_dir)
        self.likeness = _pack_likeness(self.out_dir, self.manifest["file"], references)
        styles = sorted(set(self.manifest["style"]))
        self.style_filter = w.Dropdown(options=["all", *styles], value="all",
                                       description="Style")
        self.starred_only = w.Checkbox(value=False, description="Starred only")
        self.export_button = w.Button(description="Export favourites", icon="download",
                                      layout=w.Layout(width="auto"))
        self.status = w.Label()
        # One card per image, made once and shown or hidden by the filters.
        self.stars: dict[str, w.ToggleButton] = {}
        self.cards: dict[str, w.VBox] = {}
        for row in self.manifest.itertuples():
            star = w.ToggleButton(value=bool(row.starred), description="Star", icon="star",
                                  layout=w.Layout(width="90px"))
            star.observe(lambda c, file=row.file: self._save_star(file, c["new"]),
                         names="value")
            self.stars[row.file] = star
            image = w.Image(value=_thumbnail_png(self.out_dir / row.file), format="png",
                            layout=w.Layout(width="192px"))
            labels = [w.Label(f"{row.style}, seed {row.seed}")]
            if row.file in self.likeness:
                labels.append(w.Label(self.likeness[row.file]))
            self.cards[row.file] = w.VBox([image, *labels, star])
            _mark_starred(self.cards[row.file], star, bool(row.starred))
        # A card is the 192 px picture, the widgets' 2 px margins and the 3 px frame on each
        # side: 202 px in a 200 px column scrolled sideways. Columns of CARD_PX leave room.
        self.grid = w.GridBox(layout=w.Layout(
            grid_template_columns=f"repeat({columns}, {CARD_PX}px)"))
        self.widget = w.VBox([w.HBox([self.style_filter, self.starred_only, self.export_button]),
                              self.status, self.grid])
        self.style_filter.observe(lambda _: self.refresh(), names="value")
        self.starred_only.observe(lambda _: self.refresh(), names="value")
        self.export_button.on_click(lambda _: self.export())
        self.refresh()

    def visible(self) -> list[str]:
        """The files the filters let through, in manifest order."""
        rows = self.manifest
        if self.style_filter.value != "all":
            rows = rows[rows["style"] == self.style_filter.value]
        if self.starred_only.value:
            rows = rows[rows["starred"]]
        return list(rows["file"])

    def refresh(self) -> None:
        self.grid.children = [self.cards[f] for f in self.visible()]
        self.status.value = f"{int(self.manifest['starred'].sum())} starred of {len(self.manifest)}"

    def star(self, file: str, starred: bool = True) -> None:
        """Star (or unstar) an image; the toggle's handler records it in manifest.csv."""
        self.stars[file].value = starred

    def _save_star(self, file: str, starred: bool) -> None:
        self.manifest = set_starred(self.out_dir, file, starred)
        _mark_starred(self.cards[file], self.stars[file], starred)
        self.refresh()

    def export(self) -> Path:
        """Copy the starred images to <pack>/favourites/."""
        folder = export_starred(self.out_dir)
        self.status.value = f"Exported {int(self.manifest['starred'].sum())} images to {folder}"
        return folder


CARD_PX = 212


def _pack_likeness(out_dir: Path, files, references) -> dict[str, str]:
    """Each image's likeness label, scored by the network that did not choose the pack's
    checkpoint; {} without references."""
    if references is None:
        return {}
    from .evaluate import _checkpoint_choice
    from .evaluate.band import LikenessScorer

    scorer = LikenessScorer(references, avoid=_checkpoint_choice(out_dir).get("chosen_by"))
    return {file: scorer.label(load_image(out_dir / file)) for file in files}


def _mark_starred(card: w.VBox, star: w.ToggleButton, starred: bool) -> None:
    """A starred card stands out at a glance: a gold frame, and the button says so."""
    star.description = "Starred" if starred else "Star"
    star.button_style = "warning" if starred else ""
    card.layout.border = "3px solid #f0ad4e" if starred else "3px solid transparent"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def same_photo(folder: Path, content: bytes) -> Path | None:
    """The file in `folder` with exactly these bytes, if one is there (a photo picked twice)."""
    if not folder.is_dir():
        return None
    content = bytes(content)
    return next((p for p in sorted(folder.iterdir()) if p.is_file()
                 and p.stat().st_size == len(content) and p.read_bytes() == content), None)


def save_photo(folder: Path, name: str, content: bytes) -> Path:
    """Write one uploaded file into `folder`; a name already taken gets a number, so nothing
    is ever overwritten. A file with the same bytes already there is not written again (a
    second copy would only be flagged as a duplicate by prepare): its path is returned."""
    folder.mkdir(parents=True, exist_ok=True)
    already = same_photo(folder, content)
    if already is not None:
        return already
    name = Path(name).name or "photo"
    target, n = folder / name, 1
    while target.exists():
        target = folder / f"{Path(name).stem}-{n}{Path(name).suffix}"
        n += 1
    target.write_bytes(bytes(content))
    return target


class PhotoUpload(_Panel):
    """Pick selfies from your computer (or phone) and save them into `folder`.

    Nothing leaves the machine the notebook runs on. Existing files are never overwritten: a
    name already taken gets a number.
    """

    def __init__(self, folder: str | Path):
        from .workspace import list_photos

        self.folder = Path(folder)
        self.picker = w.FileUpload(accept="image/*,.heic,.heif,.zip", multiple=True,
                                   description="Choose photos", layout=w.Layout(width="auto"))
        have = len(list_photos(self.folder))
        self.status = w.Label(f"Photos are saved to {self.folder}" + (
            f" ({have} already there)." if have else "."))
        self.widget = w.VBox([self.picker, self.status])
        self.picker.observe(lambda _: self.save(), names="value")

    def save(self) -> list[Path]:
        """Write the picked files; returns the paths of those written (a photo already in the
        folder, byte for byte, is skipped and named in the status line)."""
        saved, skipped = _save_all(self.folder, uploaded_files(self.picker.value))
        if saved or skipped:
            self.status.value = _saved_line(self.folder, saved, skipped)
        return saved


def _save_all(folder: Path, files) -> tuple[list[Path], list[str]]:
    """Save (name, bytes) pairs: the paths written, and the names of those already there."""
    saved, skipped = [], []
    for name, content in files:
        if same_photo(folder, content) is not None:
            skipped.append(Path(name).name)
        else:
            saved.append(save_photo(folder, name, content))
    return saved, skipped


def _saved_line(folder: Path, saved: list[Path], skipped: list[str]) -> str:
    line = f"Saved {_photos(len(saved))} to {folder}."
    if skipped:
        line += (f" {_photos(len(skipped))} already there with the same content, not saved "
                 f"again: {', '.join(skipped)}.")
    return line


def _photos(n: int) -> str:
    return f"{n} photo{'' if n == 1 else 's'}"


def uploaded_files(value) -> list[tuple[str, bytes]]:
    """(name, content) of each file in a FileUpload's value: ipywidgets 8 gives a tuple of
    dicts with a "name", 7.x (Colab's, Kaggle's) a dict from name to {"content", "metadata"}."""
    if isinstance(value, dict):
        return [(name, bytes(item["content"])) for name, item in value.items()]
    return [(item["name"], bytes(item["content"])) for item in value]


def upload_photos(folder: str | Path):
    """The upload step. On Colab with no photos in `folder` yet, Colab's own file picker, which
    holds Run All until the files are chosen; otherwise a PhotoUpload panel."""
    from .workspace import is_colab, list_photos

    folder = Path(folder)
    if not list_photos(folder) and is_colab():  # Kaggle carries google.colab, not its picker
        try:
            from google.colab import files
        except ImportError:
            pass
        else:
            picked = files.upload()
            print(_saved_line(folder, *_save_all(folder, picked.items())))
            return None
    return PhotoUpload(folder)


class TrainingMonitor(_Panel):
    """A live loss curve and the growing validation grid while `train_lora` runs.

    Pass `**monitor.callbacks()` to `train_lora`; the pictures update in place every
    `every` steps, without flooding the notebook with one plot per step.
    """

    def __init__(self, every: int = 10):
        self.every = every
        # Shown at their own size (a stretched plot is a blurry plot), and only once drawn:
        # an empty image widget shows as a broken image.
        self.loss, self.validation = (w.Image(format="png", layout=_natural_size())
                                      for _ in range(2))
        self.status = w.Label("Waiting for the first step...")
        self.widget = w.VBox([self.status, self.loss, self.validation],
                             layout=w.Layout(align_items="flex-start"))
        self.records: list[dict] = []

    def callbacks(self) -> dict:
        return {"on_step": self.on_step, "on_validation": self.on_validation}

    def on_step(self, trainer, record: dict) -> None:
        # The trainer's whole history: a resumed run shows the steps before the restart too.
        self.records = list(trainer.history)
        done = record["step"] >= trainer.cfg.steps
        self.status.value = (f"{'finished: ' if done else ''}step {record['step']} of "
                             f"{trainer.cfg.steps}, loss {record['loss']:.4f}")
        if record["step"] % self.every == 0 or done:
            self.draw()

    def draw(self) -> None:
        import matplotlib.pyplot as plt

        from .images import plot_loss

        if all(math.isnan(r["loss"]) for r in self.records):
            return
        fig = plot_loss(self.records)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        _show(self.loss, buffer.getvalue())

    def on_validation(self, trainer, step: int, images, grid: Image.Image) -> None:
        _show(self.validation, _png_bytes(grid))


def _natural_size() -> w.Layout:
    return w.Layout(width="auto", height="auto", max_width="100%", display="none")


def _show(image: w.Image, png: bytes) -> None:
    image.value = png
    image.layout.display = ""
