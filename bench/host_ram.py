"""Host RAM of the whole SDXL flow at full size: load, cache, train, save, free, reload for
generation. On free Colab (12.7 GB of host RAM) it must stay under 11 GB.
Writes results/bench/host_ram.json.

The model is SDXL base 1.0's architecture with random weights (bench/_sdxl_fullsize.py), stored
in fp16 once under models/ (git-ignored). The flow is the library's own: `train_lora` (the real
Trainer: `load_pipeline`, latent and caption caching, `add_lora`, 8-bit AdamW, one training
step, `save_lora`, then `del trainer` + `gc.collect()`), followed by `load_pipeline` +
`load_lora_weights` and one denoising call, as the generate stage does. It runs on the CPU in
fp16 (the dtype a T4 trains in), in a fresh process so the peak RSS is the flow's own; a
sampler thread reads /proc/self/status every 50 ms for per-phase peaks.

What differs from Colab, and why:
- Images are 64 px, not 1024: fp16 convolutions on this CPU run at about 0.3 GFLOP/s (fp32:
  about 30), so the VAE encodes a 64 px photo in about 30 s and a 1024 px one would take hours.
  Activations are a few MB here; on Colab they live on the GPU, not in host RAM.
- Everything stays in host RAM. On Colab `pipe.to("cuda")` moves the weights to the GPU, so
  this is the worse case for host RAM.
- The weights here are fp16 files, loaded without a cast: safetensors maps them, so they count
  as file-backed RSS (`RssFile`, page cache the kernel can drop) once touched, not as anonymous
  memory. Loading fp32 files into fp16 instead makes an anonymous copy of every weight.

Usage: python bench/host_ram.py [--steps 0|1] [--resolution 64] [--photos 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _sdxl_fullsize as sdxl_fullsize
from common import ROOT, peak_rss_mb, write_result

TARGET_GB = 11.0  # free Colab has 12.7 GB of host RAM; leave room for the kernel and notebook
GUARD_ANON_GB = 14.0  # stop the child rather than let it take this machine's RAM from others
SAMPLES = ("obama.jpg", "obama2.jpg", "obama3.jpg")
GB = 1024 ** 3


# ---------------------------------------------------------------------------------------------
# Memory sampling (child process)


def status_bytes() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PhaseRecorder:
    """Per-phase RSS: the value when the phase ends and the highest sampled during it."""

    def __init__(self, interval: float = 0.05):
        self.phases: list[dict] = []
        self.lock = threading.Lock()
        self.start = self.phase_start = time.perf_counter()
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self.guard_tripped = False
        threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _sample(self, interval: float) -> None:
        while True:
            now = status_bytes()
            with self.lock:
                for key in self.peak:
                    self.peak[key] = max(self.peak[key], now[key])
            if now["RssAnon"] > GUARD_ANON_GB * GB:
                print(f"host_ram: anonymous RSS passed {GUARD_ANON_GB} GB; stopping so other "
                      "work on this machine keeps its memory.", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(interval)

    def mark(self, name: str, **extra) -> dict:
        now, t = status_bytes(), time.perf_counter()
        with self.lock:
            peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            self.peak = {k: 0 for k in self.peak}
        row = {
            "phase": name, "seconds": round(t - self.phase_start, 1),
            "rss_gb": round(now["VmRSS"] / GB, 2), "anon_gb": round(now["RssAnon"] / GB, 2),
            "file_gb": round(now["RssFile"] / GB, 2),
            "peak_rss_in_phase_gb": round(peak["VmRSS"] / GB, 2),
            "peak_anon_in_phase_gb": round(peak["RssAnon"] / GB, 2),
            "ru_maxrss_gb": round(peak_rss_mb() / 1024, 2), **extra,
        }
        self.phases.append(row)
        self.phase_start = t
        print(f"[host_ram] {json.dumps(row)}", file=sys.stderr, flush=True)
        return row


# ---------------------------------------------------------------------------------------------
# The measured flow (child process)


def measured_flow(model: Path, data_dir: Path, steps: int, resolution: int) -> dict:
    rec = PhaseRecorder()
    import dataclasses

    import torch

    from headshot_kit import models
    from headshot_kit import train as train_mod
    from headshot_kit.config import get_preset
    from headshot_kit.lora import LORA_WEIGHTS

    rec.mark("imports")
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    # Phase marks are wrapped around the library's own functions; behaviour is unchanged.
    Trainer = train_mod.Trainer
    originals = {"load_pipeline": models.load_pipeline, "add_lora": train_mod.add_lora,
                 "init": Trainer.__init__, "cache": Trainer._cache_inputs, "save": Trainer.save}
    lora_calls = []

    def load_pipeline(*args, **kwargs):
        pipe = originals["load_pipeline"](*args, **kwargs)
        rec.mark("load", what="models.load_pipeline(folder, 'sdxl', dtype=float16)")
        return pipe

    def cache_inputs(self, *args, **kwargs):
        originals["cache"](self, *args, **kwargs)
        rec.mark("cache", what=f"VAE latents of {len(self.examples)} photos at {resolution} px "
                 "+ family.encode_prompts of their captions")

    def add_lora(*args, **kwargs):
        params = originals["add_lora"](*args, **kwargs)
        lora_calls.append(sum(p.numel() for p in params))
        return params

    def init(self, *args, **kwargs):
        originals["init"](self, *args, **kwargs)
        rec.mark("lora_and_optimizer", what="add_lora on the UNet, make_optimizer, "
                 "accelerator.prepare", lora_parameters=sum(lora_calls),
                 optimizer=self.optimizer_name)

    def on_step(trainer, record):
        rec.mark("train_step", what=f"Trainer.train_step at {resolution} px, gradient "
                 "checkpointing, batch 1", loss=record["loss"], skipped=bool(record["skipped"]))

    def save(self, *args, **kwargs):
        result = originals["save"](self, *args, **kwargs)
        rec.mark("save", what="Trainer.save: save_lora, export_kohya, metrics, config, card")
        return result

    def patch(load, add, init_, cache, save_):
        models.load_pipeline, train_mod.add_lora = load, add
        Trainer.__init__, Trainer._cache_inputs, Trainer.save = init_, cache, save_

    patch(load_pipeline, add_lora, init, cache_inputs, save)
    preset = get_preset("sdxl-t4")
    cfg = dataclasses.replace(
        preset.train, model=str(model), resolution=resolution, steps=max(steps, 1),
        grad_accum=1, mixed_precision="fp16", checkpoint_every=0, validate_every=0)
    out_dir = Path(tempfile.mkdtemp(prefix="host_ram_lora_"))
    if steps:
        # The library's whole training call, unchanged: Trainer(...).run(), del, gc.collect().
        trainer_used = "headshot_kit.train.train_lora (the real Trainer, run and free)"
        train_mod.train_lora(data_dir, out_dir, cfg, progress=False, on_step=on_step)
    else:
        # train_lora with the step loop left out (validate_train asks for at least one step).
        trainer_used = "Trainer(...) + Trainer.save() + del + gc.collect() (train_lora minus run)"
        trainer = Trainer(data_dir, out_dir, cfg, progress=False)
        trainer.save()
        del trainer
        gc.collect()
    patch(*originals.values())
    rec.mark("free", what="train_lora returned: del trainer + gc.collect()")
    config = json.loads((out_dir / "config.json").read_text())

    # Reload for generation, as the generate stage does on a GPU (fp16), with the LoRA.
    pipe = models.load_pipeline(str(model), "sdxl", dtype=torch.float16)
    pipe.load_lora_weights(str(out_dir), weight_name=LORA_WEIGHTS)
    rec.mark("reload", what="models.load_pipeline + pipe.load_lora_weights(out_dir)")
    # One denoising step of the real pipeline call pages in the text encoders and UNet, as
    # generation would; the VAE decode is left out (output_type='latent').
    with torch.inference_mode():
        latents = pipe("a photo of ohwx person, corporate headshot", num_inference_steps=1,
                       height=resolution, width=resolution, guidance_scale=5.0,
                       output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    rec.mark("generate", what=f"pipe(..., num_inference_steps=1, {resolution} px, "
             "output_type='latent'): text encoders + UNet with CFG, no VAE decode",
             finite=bool(torch.isfinite(latents).all()))
    n_loaded_lora = sum(1 for n, _ in pipe.unet.named_parameters() if "lora_" in n)
    del pipe
    gc.collect()
    rec.mark("end")
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"phases": rec.phases, "trainer_path": trainer_used,
            "lora_parameters_trained": config.get("trainable_parameters"),
            "optimizer": config.get("optimizer_used"),
            "lora_tensors_loaded_in_reload": n_loaded_lora,
            "train_config": {k: config[k] for k in (
                "resolution", "steps", "rank", "lr", "mixed_precision", "optimizer",
                "gradient_checkpointing", "cache_latents", "grad_accum")},
            "child_wall_s": round(time.perf_counter() - rec.start, 1),
            "peak_rss_gb": round(peak_rss_mb() / 1024, 2)}


# ---------------------------------------------------------------------------------------------
# What Colab loads today: fp32 files cast to fp16 (child processes)


def probe_build(folder: Path) -> None:
    """OpenCLIP-bigG's text tower (SDXL's text_encoder_2) saved in fp32, as the hub stores it."""
    import torch

    from headshot_kit.models import quiet_libraries

    quiet_libraries()
    torch.manual_seed(3)
    sdxl_fullsize._build_component("text_encoder_2").save_pretrained(folder)


def probe_load(folder: Path) -> dict:
    """Load the fp32 file into fp16 the way the pipeline loads each component."""
    import torch
    from transformers import CLIPTextModelWithProjection

    from headshot_kit.models import quiet_libraries

    quiet_libraries()
    before = status_bytes()
    model = CLIPTextModelWithProjection.from_pretrained(folder, dtype=torch.float16,
                                                        low_cpu_mem_usage=True)
    after = status_bytes()
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "dtype_loaded": str(model.dtype),
            "baseline_rss_gb": round(before["VmRSS"] / GB, 2),
            "anon_added_gb": round((after["RssAnon"] - before["RssAnon"]) / GB, 2),
            "file_gb_after": round(after["RssFile"] / GB, 2),
            "peak_rss_gb": round(peak_rss_mb() / 1024, 2)}


def fp32_cast_probe(params: dict) -> dict:
    """Measure one fp32->fp16 component load, then scale it to the whole pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "text_encoder_2"
        for flag in ("--probe-build", "--probe-load"):
            out = subprocess.run([sys.executable, __file__, flag, str(folder)], text=True,
                                 stdout=subprocess.PIPE, check=False)
            if out.returncode:
                raise SystemExit(f"The fp32 load probe failed ({flag}); see its stderr.")
        file_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GB
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    # The transient peak of the probe over its baseline, in units of the component's fp16 size.
    fp16_gb = probe["parameters"] * 2 / GB
    transient = (probe["peak_rss_gb"] - probe["baseline_rss_gb"]) / fp16_gb
    # diffusers loads model_index.json's components in order: both text encoders are already
    # resident (fp16, anonymous) when the UNet's fp32 file is read and cast.
    gb = {k: v * 2 / GB for k, v in params.items()}
    unet_peak = (probe["baseline_rss_gb"] + gb["text_encoder"] + gb["text_encoder_2"]
                 + transient * gb["unet"])
    return {
        "what": "measured: text_encoder_2 saved in fp32 (as the hub's default files are) and "
                "loaded with dtype=float16, low_cpu_mem_usage=True, in a fresh process; "
                "estimated: the same ratio applied to the whole pipeline",
        "probe": {**probe, "fp32_file_gb": round(file_gb, 2),
                  "transient_peak_over_fp16_size": round(transient, 2)},
        "estimated_pipeline_load_peak_rss_gb": round(unet_peak, 2),
        "estimated_anon_after_load_gb": round(probe["baseline_rss_gb"] + sum(gb.values()), 2),
        "estimated_target_met": unet_peak < TARGET_GB,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def ensure_model() -> dict:
    """The fp16 model's build record, building it in its own process on the first run."""
    info = sdxl_fullsize.cached_info()
    if info is not None:
        return {**info, "built_this_run": False}
    print("Building the full-size SDXL stand-in (about 7 GB on disk, a few minutes)...",
          flush=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(Path(sdxl_fullsize.__file__))],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"Building {sdxl_fullsize.FOLDER} failed:\n{out.stderr[-3000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return {**info, "built_this_run": True,
            "build_process_wall_s": round(time.perf_counter() - start, 1)}


def prepare_data(folder: Path, n_photos: int) -> Path:
    from headshot_kit.config import get_preset
    from headshot_kit.prepare import prepare_photos

    photos = [ROOT / "data" / "samples" / "photos" / name for name in SAMPLES[:n_photos]]
    prepare_photos(photos, folder / "data", get_preset("sdxl-t4").prepare)
    return folder / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, default=1, choices=(0, 1),
                        help="training steps of the full UNet on the CPU (about a minute each)")
    parser.add_argument("--resolution", type=int, default=64,
                        help="training/VAE resolution; fp16 convolutions are slow on a CPU")
    parser.add_argument("--photos", type=int, default=3, choices=(1, 2, 3),
                        help="prepared sample photos to cache")
    parser.add_argument("--skip-fp32-probe", action="store_true",
                        help="leave out the fp32-file load probe (about a minute, 3 GB)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-load", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measured_flow(Path(args.child[0]), Path(args.child[1]), args.steps,
                               args.resolution)
        print(json.dumps(result))
        return
    if args.probe_build:
        probe_build(args.probe_build)
        return
    if args.probe_load:
        print(json.dumps(probe_load(args.probe_load)))
        return

    start = time.perf_counter()
    build = ensure_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(Path(tmp), args.photos)
        child = subprocess.run(
            [sys.executable, __file__, "--steps", str(args.steps), "--resolution",
             str(args.resolution), "--child", str(sdxl_fullsize.FOLDER), str(data)],
            stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode:
        raise SystemExit(f"The measured run failed (exit {child.returncode}); see its stderr.")
    flow = json.loads(child.stdout.strip().splitlines()[-1])
    params = build["parameters"]
    fp32 = None if args.skip_fp32_probe else fp32_cast_probe(params)
    peak = flow["peak_rss_gb"]
    peak_anon = max(p["peak_anon_in_phase_gb"] for p in flow["phases"])
    write_result("host_ram", {
        "model": "SDXL base 1.0 architecture, random weights, fp16 safetensors "
                 f"({sdxl_fullsize.FOLDER.relative_to(ROOT)})",
        "parameters": {**params, "total": sum(params.values())},
        "units": "GB = 2**30 bytes (GiB) throughout",
        "fp16_weights_gb": round(sum(params.values()) * 2 / GB, 2),
        "target_gb": TARGET_GB,
        "peak_rss_gb": peak,
        "target_met": peak < TARGET_GB,
        "peak_anon_gb": peak_anon,
        "note_on_rss": "peak_rss_gb is ru_maxrss (bench/common.peak_rss_mb): anonymous memory "
                       "plus file-backed pages. The fp16 weights are mmapped by safetensors and "
                       "show as file_gb once touched (page cache the kernel can reclaim).",
        "phases": flow["phases"],
        "trainer_path": flow["trainer_path"],
        "train_config": flow["train_config"],
        "lora_parameters_trained": flow["lora_parameters_trained"],
        "optimizer": flow["optimizer"],
        "lora_tensors_loaded_in_reload": flow["lora_tensors_loaded_in_reload"],
        "ran": [f"{len(SAMPLES[:args.photos])} sample photos prepared (not measured)",
                "load_pipeline (fp16, low_cpu_mem_usage, local folder: no fp16-fix VAE)",
                f"VAE latents + caption embeddings cached at {args.resolution} px",
                "peft LoRA on the UNet, bitsandbytes 8-bit AdamW, accelerate fp16",
                f"{args.steps} training step(s) at {args.resolution} px",
                "save_lora + kohya export", "del trainer + gc.collect()",
                "load_pipeline + load_lora_weights", "one 1-step pipeline call (no decode)"],
        "not_run": [f"{args.resolution} px instead of 1024 px (CPU fp16 convolutions)",
                    "more than one training step, validation images, checkpoints",
                    "VAE decode of generated images",
                    "the hub fp16-fix VAE (local folder)",
                    ("the whole flow from fp32 files (see hub_fp32_files_cast_to_fp16: one "
                     "component measured, the pipeline estimated)"),
                    ("GPU: everything stays in host RAM (worse than Colab, where the weights "
                     "move to the T4)")],
        "hub_fp32_files_cast_to_fp16": fp32,
        "build": build,
        "run_wall_s": flow["child_wall_s"],
        "wall_s": round(time.perf_counter() - start, 1),
    })


if __name__ == "__main__":
    main()
