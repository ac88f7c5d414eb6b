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
           "reload_and_generate": None}


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
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


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
