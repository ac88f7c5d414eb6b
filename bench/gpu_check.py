"""The T4 presets end to end at full size on a GPU, measured beside the fit check's plan.

For each T4 preset (sd15-t4, sdxl-t4) this runs what a Colab user runs, through the library's
own functions: prepare's output as input, `Trainer` (load, latent and caption caching, LoRA,
optimizer), N training steps, a validation render, a checkpoint, a resumed Trainer for a few
more steps, save, free, then `generate_pack` (reload with the LoRA, a few images). Each phase
records its seconds, `torch.cuda.max_memory_allocated`/`max_memory_reserved` since the phase
began, the host's peak RSS in the phase, and any error with its traceback: a failing phase is
recorded and the next one still runs. The fit check's predicted memory for the matching phase
(`fitcheck.fit_check(cfg, "t4")`) stands beside each measurement. Writes
results/bench/gpu_check.json after every phase, so a run cut short keeps what it measured.

The models are the families' architectures from headshot_kit/data/arch/ with random weights
(fitcheck.build_arch), built on the GPU once, saved in fp16 as ordinary diffusers folders under
models/ (git-ignored) and loaded by `models.load_pipeline`, as hub models are: no network. Memory
follows the shapes and dtypes, not the values. SDXL's stand-in VAE has `force_upcast` off, as
the fp16-fix VAE that load_pipeline swaps in for the hub model.

It behaves as a T4 would: training is forced to fp16 (a larger GPU would pick bf16), and the
process's allocator is capped at a T4's 15 GiB less the CUDA context
(`torch.cuda.set_per_process_memory_fraction`), so it runs out of memory where a T4 would;
`torch.cuda.mem_get_info` reports that budget too, so generation sizes its batches as on a T4.

On a GPU machine without network or dlib: torch, transformers, peft and accelerate must be
installed, and diffusers too (carry its wheel). Without bitsandbytes the run uses the library's
fallback, torch AdamW, and plans with it. Without dlib, prepare cannot find faces: pass
`--data DIR` with datasets prepared beforehand on a machine with dlib (`headshot-kit prepare
--photos PHOTOS --preset sdxl-t4 --out DIR/sdxl-t4`, likewise sd15-t4, PHOTOS a folder of
data/samples/photos' obama*.jpg), or let it fall back to centre crops of those photos with the
preset's caption (the JSON says which it used).

The journey ETA (headshot_kit.fitcheck.eta) is checked in the same call: one render at the
preset's steps, guidance and size (decoded as the pack decodes), the face-detail pass at full
size on a real photo (data/samples/photos/obama.jpg, centre-cropped to the model's size: a first
render that holds a face) and evaluate on the pack time their units; `journey` in the JSON
scales each measured unit (a training step, a render, a face pass, a load, a scored face) to
the preset's whole journey beside the ETA's prediction of that phase. Only the download is not
measured (no network there).

Usage:
  python bench/gpu_check.py                 # on a CUDA GPU (estimated 5 minutes on an H200)
  python bench/gpu_check.py --tiny          # the same code, tiny models, on the CPU (~1 min)
  python bench/gpu_check.py --presets sdxl-t4 --steps 10 --resume-steps 3 --data DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import host_ram
from common import RESULTS, ROOT

PRESETS = ("sd15-t4", "sdxl-t4")
SAMPLES = ("obama.jpg", "obama2.jpg", "obama3.jpg")
T4_GIB = 15.0  # nvidia-smi's 15360 MiB: the budget the fit check plans against
GIB, GB = 2**30, 1e9
# Bumped whenever the stand-in models change, so stale folders are rebuilt.
MODEL_VERSION = 1
# The fit check's phase that each measured phase corresponds to (None: it plans none).
PLANNED = {"build_model": None, "prepare": None, "load_and_cache": "caching", "train": "training",
           "validation": "validation", "checkpoint": None, "resume": "caching",
           "resume_train": "training", "save": None, "free": None,
           "reload_and_generate": None, "render": None, "face_pass": None, "evaluate": None}
# The photo the full-size face pass redraws: a real face, as a first render would hold one.
FACE_PHOTO = "obama.jpg"


# ---------------------------------------------------------------------------------------------
# Stand-in models


def model_folder(family: str) -> Path:
    return ROOT / "models" / f"gpu-check-{family}"


def ensure_full_size_model(family: str, device: str) -> dict:
    """The family's architecture with random fp16 weights, saved once as a diffusers folder."""
    import diffusers
    import torch

    from headshot_kit.families import get_family, tiny_tokenizer
    from headshot_kit.families.sd15 import sd_scheduler
    from headshot_kit.fitcheck import build_arch
    from headshot_kit.models import quiet_libraries
    from headshot_kit.storage import atomic_dir

    folder = model_folder(family)
    marker = folder / "headshot_kit_gpu_check.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == MODEL_VERSION:
        return {"folder": str(folder), "built": False}
    quiet_libraries()
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16: half the memory, no cast on save
    try:
        torch.manual_seed(0)
        parts = build_arch(family, device)  # on the GPU: seconds, where the CPU takes minutes
    finally:
        torch.set_default_dtype(previous)
    if family == "sdxl":
        parts["vae"].register_to_config(force_upcast=False)
    spec = get_family(family)
    tokenizers = {"tokenizer": tiny_tokenizer()}
    if len(spec.text_encoders) > 1:
        tokenizers["tokenizer_2"] = tiny_tokenizer()
    extra = ({"safety_checker": None, "feature_extractor": None,
              "requires_safety_checker": False} if family == "sd15" else {})
    pipe = getattr(diffusers, spec.pipeline_class)(**parts, **tokenizers,
                                                    scheduler=sd_scheduler(), **extra)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / marker.name).write_text(json.dumps({"version": MODEL_VERSION,
                                                   "parameters": counts}) + "\n")
    del pipe, parts
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"folder": str(folder), "built": True, "parameters": counts,
            "build_s": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------------------------
# Settings and data


def run_configs(name: str, tiny: bool, model: str, steps: int, resume_steps: int,
                checkpoint_dir: Path):
    """The preset's prepare/train/generate configs as the check runs them: fp16 as on a T4
    (fp32 for the tiny models: fp16 convolutions crawl on a CPU), the validation render and
    checkpoint driven by hand, few sampling steps (memory does not grow with them)."""
    from headshot_kit.config import get_preset

    preset = get_preset(name)
    train = dataclasses.replace(
        preset.train, model=model, mixed_precision="fp16", steps=steps + resume_steps,
        validate_every=0, checkpoint_every=0, validation_steps=4,
        checkpoint_dir=str(checkpoint_dir))
    generate = dataclasses.replace(preset.generate, model=model, styles=["corporate"],
                                   seeds=[0, 1], steps=4)
    prepare = preset.prepare
    if tiny:
        small = get_preset("tiny")
        train = dataclasses.replace(train, resolution=small.train.resolution,
                                    optimizer_min_8bit_size=0, mixed_precision="no")
        generate = dataclasses.replace(generate, resolution=small.generate.resolution)
        prepare = small.prepare
    return prepare, train, generate


def prepared_data(name: str, prepare_cfg, folder: Path, given: Path | None) -> tuple[Path, str]:
    """A prepared dataset of the sample photos, and how it was made."""
    if given is not None:
        data = given / name if (given / name / "metadata.jsonl").is_file() else given
        return data, f"given: {data}"
    from headshot_kit.faces import FaceModelsMissing
    from headshot_kit.prepare import prepare_photos

    photos = [ROOT / "data" / "samples" / "photos" / n for n in SAMPLES]
    try:
        prepare_photos(photos, folder, prepare_cfg)
        return folder, "prepare_photos on the sample photos"
    except (FaceModelsMissing, ImportError) as exc:
        return centre_crops(photos, folder, prepare_cfg), (
            f"centre crops of the sample photos: prepare could not run ({exc})")


def centre_crops(photos: list[Path], folder: Path, cfg) -> Path:
    """The dataset layout prepare writes, without face detection: square centre crops."""
    from headshot_kit.images import centre_square, load_image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for photo in photos:
        centre_square(load_image(photo), cfg.resolution).save(folder / f"{photo.stem}.png")
        lines.append(json.dumps({"file_name": f"{photo.stem}.png", "text": cfg.caption()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# Measuring


class Check:
    """The report: per preset and phase, what was measured beside what was planned."""

    def __init__(self, out: Path, cuda: bool, info: dict):
        self.out, self.cuda, self.info = out, cuda, info
        self.presets: dict[str, dict] = {}
        self.recorder = host_ram.PhaseRecorder()

    @contextmanager
    def phase(self, preset: str, name: str, plan=None):
        """Measure the block; record any error instead of raising, then write the report.
        `plan`: the fit check's plan, or a function giving it once the block has run."""
        import torch

        row = {"phase": name}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.recorder.mark(f"{preset}:{name}:start")
        start = time.perf_counter()
        try:
            yield row
        except Exception as exc:  # a failing phase must not lose the others' figures
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
        if self.cuda:
            torch.cuda.synchronize()
            row["max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
            row["max_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 3)
            row["allocated_after_gb"] = round(torch.cuda.memory_allocated() / GB, 3)
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["host_peak_rss_gb"] = self.recorder.mark(f"{preset}:{name}")[
            "peak_rss_in_phase_gb"]
        planned = PLANNED[name]
        plan = plan() if callable(plan) else plan
        if plan is not None and planned:
            row.update(predicted(plan, planned, row))
        self.presets.setdefault(preset, {"phases": []})["phases"].append(row)
        self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"benchmark": "gpu_check", **self.info, "presets": self.presets}
        self.out.write_text(json.dumps(data, indent=2, default=str) + "\n")


def predicted(plan, planned: str, row: dict) -> dict:
    """The fit check's figures for a phase: its tensors (what max_memory_allocated counts) and
    the plan's peak with fragmentation and the CUDA context (what nvidia-smi would show)."""
    phases = plan.phases
    gb = (max(phases.get("forward/backward", 0), phases.get("optimizer step", 0))
          if planned == "training" else phases.get(planned))
    out = {"fit_check_phase": planned, "predicted_allocated_gb": gb and round(gb, 3),
           "predicted_peak_gb": round(plan.total_gb, 3)}
    if gb and row.get("max_allocated_gb"):
        out["measured_over_predicted"] = round(row["max_allocated_gb"] / gb, 3)
    return out


def cap_like_a_t4(check_info: dict) -> None:
    """Cap the allocator at a T4's memory less the CUDA context, and report that budget as
    the free memory, as a T4 would."""
    import torch

    from headshot_kit.fitcheck import CUDA_CONTEXT_GIB

    total = torch.cuda.get_device_properties(0).total_memory
    cap = (T4_GIB - CUDA_CONTEXT_GIB) * GIB
    torch.cuda.set_per_process_memory_fraction(cap / total)
    real = torch.cuda.mem_get_info

    def t4_mem_get_info(device=None):
        free, _ = real(device)
        return min(free, int(cap - torch.cuda.memory_reserved())), int(T4_GIB * GIB)

    torch.cuda.mem_get_info = t4_mem_get_info
    check_info.update(memory_cap_gib=round(cap / GIB, 2), gpu_total_gib=round(total / GIB, 1))


# ---------------------------------------------------------------------------------------------
# One preset


def timed_steps(trainer, n: int, cuda: bool) -> list[float]:
    import torch

    times = []
    for _ in range(n):
        start = time.perf_counter()
        record = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if record["loss"] != record["loss"]:  # NaN: say so, the run may still recover
            print(f"gpu_check: NaN loss at step {record['step']}", file=sys.stderr)
    return times


def step_figures(trainer, times: list[float]) -> dict:
    history = trainer.history[-len(times):] if times else []
    return {"steps": len(times), "step_seconds": [round(t, 3) for t in times],
            "median_step_seconds": round(statistics.median(times), 3) if times else None,
            "losses": [r["loss"] for r in history],
            "skipped": sum(bool(r["skipped"]) for r in history)}


def check_preset(check: Check, name: str, args, work: Path, model: str) -> None:
    """Every phase of one preset, in order; a phase whose input is missing records why."""
    import torch

    from headshot_kit import fitcheck
    from headshot_kit.generate import generate_pack
    from headshot_kit.train import Trainer

    cuda = check.cuda
    prepare_cfg, train_cfg, gen_cfg = run_configs(name, args.tiny, model, args.steps,
                                                  args.resume_steps, work / "checkpoints")
    data, lora_dir, plans, trainer = None, work / "lora", {}, None
    with check.phase(name, "prepare") as row:
        data, row["how"] = prepared_data(name, prepare_cfg, work / "data", args.data)
    with check.phase(name, "load_and_cache", lambda: plans.get("t4")) as row:
        trainer = Trainer(data, lora_dir, train_cfg, progress=False)
        row["optimizer"] = trainer.optimizer_name
        # Planned with the optimizer that really runs (torch AdamW when bitsandbytes fails).
        used = {"torch AdamW": "adamw", "Prodigy": "prodigy"}.get(trainer.optimizer_name,
                                                                  "adamw8bit")
        # The run validates and checkpoints once, by hand; the plan must count that render.
        planned_cfg = dataclasses.replace(train_cfg, optimizer=used, validate_every=args.steps,
                                          checkpoint_every=args.steps)
        plans["t4"] = plan = fitcheck.fit_check(planned_cfg, "t4")
        check.presets.setdefault(name, {"phases": []}).update(
            plan={"phases_gb": plan.phases, "peak_gb": plan.total_gb,
                  "peak_phase": plan.peak_phase, "fits": plan.fits,
                  "t4_step_seconds": plan.step_seconds, "dtype": plan.dtype})
    plan = plans.get("t4")
    with check.phase(name, "train", plan) as row:
        row.update(step_figures(trainer, timed_steps(trainer, args.steps, cuda)))
    with check.phase(name, "validation", plan) as row:
        trainer.validate()
        row["images"] = len(trainer.validation_rows[-1][1])
    with check.phase(name, "checkpoint", plan) as row:
        row["folder"] = str(trainer.save_checkpoint())
    with check.phase(name, "resume", plan) as row:
        trainer.close()
        trainer = Trainer(data, lora_dir, train_cfg, progress=False)
        row["resumed_at_step"] = trainer.step
        if trainer.step != args.steps:
            raise RuntimeError(f"resumed at step {trainer.step}, expected {args.steps}")
    with check.phase(name, "resume_train", plan) as row:
        row.update(step_figures(trainer, timed_steps(trainer, args.resume_steps, cuda)))
    with check.phase(name, "save", plan) as row:
        row["lora"] = str(trainer.save().lora_path)
    with check.phase(name, "free", plan) as row:
        trainer.close()
        trainer = None
    with check.phase(name, "reload_and_generate", plan) as row:
        pack = generate_pack(lora_dir, work / "generated", gen_cfg, progress=False)
        row["images"] = len(pack.images)
        row["timings"] = pack.timings
    eta_phases(check, name, args, work, model, lora_dir, data)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def eta_gen_config(name: str, tiny: bool, model: str):
    """The preset's generate config as the pack renders it (its steps, guidance and size);
    the tiny models render at their own size and steps."""
    from headshot_kit.config import get_preset

    cfg = dataclasses.replace(get_preset(name).generate, model=model, styles=["corporate"],
                              seeds=[0])
    if tiny:
        small = get_preset("tiny").generate
        cfg = dataclasses.replace(cfg, resolution=small.resolution, steps=small.steps)
    return cfg


def face_photo(resolution: int):
    """A real photo holding a face, centre-cropped to the model's size."""
    from headshot_kit.images import centre_square, load_image

    photo = ROOT / "data" / "samples" / "photos" / FACE_PHOTO
    return centre_square(load_image(photo), resolution)


def eta_phases(check: Check, name: str, args, work: Path, model: str, lora_dir: Path,
               data: Path | None) -> None:
    """The ETA's units, timed: a render, a full-size face pass on a real face, evaluate; then
    the journey, each phase measured-and-scaled beside predicted."""
    import torch

    from headshot_kit.fitcheck import eta as E
    from headshot_kit.fitcheck.gpus import GPUS
    from headshot_kit.generate import (detail_shot, first_render, load_generate_pipeline,
                                       load_styles, make_shot, use_lora)
    from headshot_kit.generate.shots import make_scheduler, model_schedule

    cfg = eta_gen_config(name, args.tiny, model)
    t4 = GPUS["t4"]
    tile = E.decode_tile(cfg, t4)
    units: dict[str, float] = {}
    pipe = None
    with check.phase(name, "render") as row:
        pipe = load_generate_pipeline(cfg)
        shot = make_shot(cfg, load_styles()[cfg.styles[0]], 0, lora_dir)
        use_lora(pipe, shot.lora_dir, shot.lora_scale)
        pipe.scheduler = make_scheduler(shot.scheduler, model_schedule(pipe))
        pipe.set_progress_bar_config(disable=True)
        first_render([dataclasses.replace(shot, steps=1)], pipe)  # warm-up: kernels, autotune
        if check.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        first_render([shot], pipe)
        if check.cuda:
            torch.cuda.synchronize()
        units["render"] = time.perf_counter() - start
        row.update(steps=shot.steps, guidance=shot.guidance, resolution=cfg.resolution,
                   decode_tiled=bool(pipe.vae.use_tiling), image_s=round(units["render"], 3),
                   eta_image_s=round(E.render_seconds(cfg.family, cfg.resolution, shot.steps,
                                                      shot.guidance, tiled_at=tile), 3))
    with check.phase(name, "face_pass") as row:
        if pipe is None:
            raise RuntimeError("no pipeline: the render phase failed")
        shot = make_shot(cfg, load_styles()[cfg.styles[0]], 0, lora_dir,
                         face_detail_strength=cfg.face_detail_strength or 0.4)
        photo = face_photo(cfg.resolution)
        start = time.perf_counter()
        try:
            result = detail_shot(shot, photo, pipe)
            row["note"] = result.note
        except Exception as exc:  # no dlib there: the same img2img on the whole photo
            if type(exc).__name__ not in ("FaceModelsMissing", "ImportError",
                                          "ModuleNotFoundError"):
                raise
            from headshot_kit.facedetail import image_to_image, pass_steps

            row["note"] = f"no face detector ({exc}): img2img on the whole photo"
            img2img = image_to_image(pipe)
            img2img.scheduler = make_scheduler(shot.scheduler, model_schedule(pipe))
            img2img(prompt=shot.prompt, image=photo, strength=shot.face_detail_strength,
                    num_inference_steps=pass_steps(shot.steps, shot.face_detail_strength),
                    guidance_scale=shot.guidance)
        if check.cuda:
            torch.cuda.synchronize()
        units["face pass"] = time.perf_counter() - start
        row.update(face_pass_s=round(units["face pass"], 3), eta_face_pass_s=round(
            E.face_pass_seconds(dataclasses.replace(cfg, face_detail=True), tiled_at=tile), 3))
    del pipe
    gc.collect()
    with check.phase(name, "evaluate") as row:
        from headshot_kit.config import EvaluateConfig
        from headshot_kit.evaluate import evaluate_images

        images = work / "generated"
        n = len(list((images / "images").glob("*.png")))
        start = time.perf_counter()
        evaluate_images(data / "images" if (data / "images").is_dir() else data, images,
                        work / "scores", EvaluateConfig(clip_model="", embedder="dlib"),
                        progress=False)
        units["evaluate"] = (time.perf_counter() - start) / max(n, 1)
        row.update(images=n, per_image_s=round(units["evaluate"], 3), eta_per_image_s=E.DLIB_S)
    check.presets[name]["journey"] = journey(check, name, units)
    check.write()


def journey(check: Check, name: str, units: dict[str, float]) -> dict:
    """Each phase of the preset's journey: the ETA's prediction on a T4 beside the measured
    unit scaled to the journey's counts (None where the unit was not measured)."""
    from headshot_kit.config import get_preset
    from headshot_kit.fitcheck import journey_eta

    preset = get_preset(name)
    eta = journey_eta(preset, "t4")
    rows = {r["phase"]: r for r in check.presets[name]["phases"]}
    t, g = preset.train, preset.generate
    n_images = len(g.styles) * len(g.seeds)
    step = rows.get("train", {}).get("median_step_seconds")
    renders = ((t.steps // t.validate_every) * len(t.validation_prompts)
               * len(t.validation_seeds)) if t.validate_every else 0
    scale = t.validation_steps / max(g.steps, 1)  # a validation render at its own steps
    loads = rows.get("reload_and_generate", {}).get("timings", {}).get("loads")
    measured = {
        "loads": 2 * loads if loads is not None else None,
        "training": step * t.steps if step else None,
        "validation": renders * units["render"] * scale if "render" in units else None,
        "checkpoints": (rows.get("checkpoint", {}).get("seconds") or 0) * (
            -(-t.steps // t.checkpoint_every) if t.checkpoint_every else 1),
        "images": n_images * units["render"] if "render" in units else None,
        "face pass": n_images * units["face pass"] if "face pass" in units else None,
        "evaluate": (n_images + 20) * units["evaluate"] if "evaluate" in units else None,
    }
    return {"predicted_total_min": round(eta.total_minutes, 2),
            "phases": {k: {"predicted_s": round(v, 1),
                           "measured_scaled_s": None if measured.get(k) is None
                           else round(measured[k], 1)} for k, v in eta.phases.items()},
            "note": "measured units (this machine, these weights) scaled to the preset's "
                    "counts; the download is not measured"}


# ---------------------------------------------------------------------------------------------
# Driver


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny models on the CPU: proves the script, measures nothing")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps before the validation render and checkpoint "
                        "(default 10)")
    parser.add_argument("--resume-steps", type=int, default=None,
                        help="steps the resumed run trains before saving (default 3)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of prepared datasets (one per preset, or one for all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    args.steps = args.steps or 10
    args.resume_steps = args.resume_steps or 3
    import torch

    from headshot_kit import models

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        # Not an error: `make bench` runs every benchmark, on machines with and without a GPU.
        print("gpu_check: no CUDA GPU here, nothing measured. Run it on a GPU machine, or with "
              "--tiny to try the script on the CPU.")
        return None
    info = {"mode": "tiny models on the CPU" if args.tiny else "full-size on the GPU",
            "torch": torch.__version__, "steps": args.steps, "resume_steps": args.resume_steps}
    if args.tiny:
        # The tiny models gain nothing from threads; on a busy small CPU they wait on each other.
        torch.set_num_threads(1)
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        host_ram.GUARD_ANON_GB = 100.0  # the guard protects the small shared CPU machine
    start = time.perf_counter()
    check = Check(args.out, cuda, info)
    builds = {}
    for name in args.presets:
        family = "sdxl" if name.startswith("sdxl") else "sd15"
        with check.phase(name, "build_model") as row:
            if args.tiny:
                builds[name] = str(models.ensure_tiny_model(f"tiny-{family}"))
            else:
                builds[name] = ensure_full_size_model(family, "cuda")["folder"]
            row["model"] = builds[name]
    if cuda:
        cap_like_a_t4(info)  # after building: the build itself may use the whole GPU
    for name in args.presets:
        if name in builds:
            with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
                check_preset(check, name, args, Path(tmp), builds[name])
    info["wall_s"] = round(time.perf_counter() - start, 1)
    errors = [f"{p}/{r['phase']}" for p, d in check.presets.items() for r in d["phases"]
              if "error" in r]
    info["errors"] = errors
    check.write()
    print(f"gpu_check: {len(errors)} phase(s) failed {errors or ''} in {info['wall_s']} s; "
          f"figures in {args.out}")
    return args.out


if __name__ == "__main__":
    main()
