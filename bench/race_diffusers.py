"""A race against diffusers' own DreamBooth LoRA script on the CPU: the same tiny model, the
same photos, 256 px, 200 steps, LoRA rank 4, AdamW (32-bit), fp32, batch 1, lr 1e-4, in the
same venv (one torch, one diffusers, one peft). Writes results/bench/race_diffusers.json.

Their side is `examples/dreambooth/train_dreambooth_lora.py` from huggingface/diffusers
(Apache-2.0), read at run time, never copied into this repository: pass `--script PATH`
(a checkout at the tag of the installed diffusers, e.g. `git clone --branch v0.42.1
https://github.com/huggingface/diffusers`), or set DIFFUSERS_DREAMBOOTH_LORA; without either
it looks for an `examples/` folder beside the installed diffusers (an editable install from a
checkout has one; the wheel and the sdist do not). It runs with its own flags for this
recipe plus `--pre_compute_text_embeddings` (it encodes the one prompt once and frees the text
encoder, as our trainer does), no validation and no intermediate checkpoints; `--report_to`
names a tracker that is installed or, when none is, a stub that logs nothing.
Our side is `headshot_kit.train.Trainer` with the tiny preset's settings but the recipe above
(the face-weighted loss, min-SNR weighting and cached latents are our defaults and stay on;
no validation, one checkpoint at the end, as a finished run always writes).

A third contestant, the floor, is the bare loop anyone would write with diffusers and peft
alone (`run_floor`): the same imports and model, the photos and the prompt encoded once, then
per step only the UNet's forward and backward and the AdamW update, and the LoRA saved. No
trainer can do less for this recipe, so its wall time over theirs is the best ratio within
reach of this model, and ours over it is what our run adds.

Each run is its own process, timed from start to exit (imports and model loading included),
with its own peak resident memory; three runs a side, alternating, medians. The target: our
wall time at most 0.75x theirs, our peak memory no more than theirs.

Their script imports torchvision (for its transforms). Where the venv has none that loads
(the PyPI wheel is a CUDA build, and with a CPU build of torch its compiled ops do not load),
`--torchvision DIR` puts a folder holding torchvision on both sides' path, and both sides then
declare the two op schemas torchvision's import registers fakes for, so that its pure-Python
transforms (all the script uses) import. Both sides see the same packages either way.

Usage: python bench/race_diffusers.py --script PATH [--torchvision DIR] [--steps 200]
           [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_result

SAMPLES = ("obama.jpg", "obama2.jpg", "obama3.jpg")
RESOLUTION, RANK, LR = 256, 4, 1e-4
PROMPT = "a photo of ohwx person"


def find_script(given: str | None) -> Path:
    """The diffusers script: --script, $DIFFUSERS_DREAMBOOTH_LORA, or an examples/ folder
    beside the installed diffusers."""
    import diffusers

    candidates = [given, os.environ.get("DIFFUSERS_DREAMBOOTH_LORA")]
    package = Path(diffusers.__file__).resolve().parent
    candidates += [str(p / "examples" / "dreambooth" / "train_dreambooth_lora.py")
                   for p in (package.parent, package.parent.parent)]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    sys.exit(f"No train_dreambooth_lora.py found for diffusers {diffusers.__version__}: pass "
             f"--script PATH to examples/dreambooth/train_dreambooth_lora.py of a diffusers "
             f"checkout at tag v{diffusers.__version__} (the installed package does not ship "
             "its examples).")


_KEEP = []


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM). Not getrusage's
    ru_maxrss: Linux starts a new program's count at the size of the process that launched
    it (this runner, with torch and diffusers imported), so both sides would read at least
    the runner's size."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def _torchvision_ops_declared() -> None:
    """Declare torchvision::nms and ::qnms when torchvision's compiled ops did not load, so its
    import (which registers fake kernels for them) succeeds; nothing here calls them."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 (loaded: nothing to do)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


def run_theirs(script: str, args: list[str]) -> None:
    """In a child process: their script as `python script args`, then our peak RSS line."""
    sys.argv = [script, *args]
    _torchvision_ops_declared()
    _stub_tracker_if_needed(args)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print("PEAK_RSS_MB", peak_rss_mb())


def _stub_tracker_if_needed(args: list[str]) -> None:
    """Their script hands --report_to to accelerate, which refuses a tracker that is not
    installed; without tensorboard a do-nothing tensorboard stands in (logging is not what
    is raced)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        return
    import accelerate.tracking as tracking

    class Quiet(tracking.GeneralTracker):
        name, requires_logging_directory = "tensorboard", False

        def __init__(self, *a, **k):
            super().__init__()

        @property
        def tracker(self):
            return None

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            pass

    import accelerate.accelerator as acc

    acc.LOGGER_TYPE_TO_CLASS = {**getattr(acc, "LOGGER_TYPE_TO_CLASS", {}),
                                "tensorboard": Quiet}
    tracking.LOGGER_TYPE_TO_CLASS["tensorboard"] = Quiet
    acc.filter_trackers = lambda log_with, logging_dir=None: [Quiet()]


def run_ours(data: str, out: str, steps: int) -> None:
    """In a child process: our Trainer on the same recipe, then the peak RSS line."""
    import dataclasses

    _torchvision_ops_declared()
    from headshot_kit.config import get_preset
    from headshot_kit.train import train_lora

    cfg = dataclasses.replace(
        get_preset("tiny").train, resolution=RESOLUTION, steps=steps, rank=RANK, lr=LR,
        optimizer="adamw", mixed_precision="no", gradient_checkpointing=False,
        validate_every=0, checkpoint_every=0, device="cpu")
    try:
        train_lora(data, out, cfg, progress=False)
    finally:
        print("PEAK_RSS_MB", peak_rss_mb())


def run_floor(model: str, images: str, out: str, steps: int) -> None:
    """In a child process: the least any trainer on this stack must do for the recipe, as
    the bare loop anyone would write with diffusers and peft alone: import, load the
    pipeline, encode the photos and the prompt once, attach the LoRA, then per step only the
    UNet's forward and backward and the AdamW update; the LoRA saved at the end. No checks,
    no logging, no records. Its wall time over theirs is the best ratio any loop can reach,
    so it says whether the target is within reach of this model at all."""
    _torchvision_ops_declared()
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from safetensors.torch import save_file

    from headshot_kit.config_checks import UNET_TARGETS  # our layers (diffusers' script's too)

    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
        pixels = []
        for path in sorted(Path(images).iterdir()):
            with Image.open(path) as im:
                im = im.convert("RGB").resize((RESOLUTION, RESOLUTION))
            array = np.asarray(im, np.float32) / 127.5 - 1
            pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        with torch.no_grad():
            latents = pipe.vae.encode(torch.stack(pixels)).latent_dist.sample()
            latents = latents * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt",
                                 max_length=pipe.tokenizer.model_max_length).input_ids
            text = pipe.text_encoder(ids)[0]
        unet.requires_grad_(False)
        torch.manual_seed(0)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                    target_modules=list(UNET_TARGETS)))
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)
        unet.train()
        for _ in range(steps):
            latent = latents[torch.randint(0, len(latents), (1,))]
            noise = torch.randn_like(latent)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
            pred = unet(scheduler.add_noise(latent, noise, t), t, text).sample
            torch.nn.functional.mse_loss(pred, noise).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        Path(out).mkdir(parents=True)
        save_file(get_peft_model_state_dict(unet), str(Path(out) / "lora.safetensors"))
    finally:
        print("PEAK_RSS_MB", peak_rss_mb())


def child(cmd: list[str], extra_path: str | None) -> dict:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    rss = [float(line.split()[1]) for line in proc.stdout.splitlines()
           if line.startswith("PEAK_RSS_MB")]
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--torchvision", help="a folder holding torchvision, put on both "
                        "sides' path")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, *rest = args.child
        if side == "floor":
            return run_floor(*rest[:3], int(rest[3]))
        return run_theirs(rest[0], rest[1:]) if side == "theirs" else run_ours(*rest[:2],
                                                                                 int(rest[2]))
    import diffusers
    import peft
    import torch

    from headshot_kit.config import get_preset
    from headshot_kit.models import ensure_tiny_model
    from headshot_kit.prepare import prepare_photos

    script = find_script(args.script)
    model = ensure_tiny_model("tiny-sd15")
    runs: dict[str, list[dict]] = {"ours": [], "theirs": [], "floor": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = ROOT / "data" / "samples" / "photos"
        prepare_photos([photos / n for n in SAMPLES], tmp / "data", get_preset("tiny").prepare)
        images = tmp / "data" / "images"
        me = [sys.executable, __file__, "--child"]
        for i in range(args.repeats):
            runs["ours"].append(child([*me, "ours", str(tmp / "data"), str(tmp / f"ours{i}"),
                                       str(args.steps)], args.torchvision))
            runs["theirs"].append(child([
                *me, "theirs", str(script), f"--pretrained_model_name_or_path={model}",
                f"--instance_data_dir={images}", f"--instance_prompt={PROMPT}",
                f"--output_dir={tmp / f'theirs{i}'}", f"--resolution={RESOLUTION}",
                "--train_batch_size=1", f"--max_train_steps={args.steps}",
                f"--learning_rate={LR}", f"--rank={RANK}", "--mixed_precision=no", "--seed=0",
                "--checkpointing_steps=1000000", "--pre_compute_text_embeddings",
                "--report_to=tensorboard"], args.torchvision))
            runs["floor"].append(child([*me, "floor", str(model), str(images),
                                        str(tmp / f"floor{i}"), str(args.steps)],
                                       args.torchvision))
            print(f"round {i + 1}: ours {runs['ours'][-1]}, theirs {runs['theirs'][-1]}, "
                  f"floor {runs['floor'][-1]}", flush=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mb")}
           for side, rs in runs.items()}
    wall = med["ours"]["wall_s"] / med["theirs"]["wall_s"]
    memory = med["ours"]["peak_rss_mb"] / med["theirs"]["peak_rss_mb"]
    write_result("race_diffusers", {
        "recipe": {"resolution": RESOLUTION, "steps": args.steps, "rank": RANK, "lr": LR,
                   "optimizer": "AdamW (32-bit)", "precision": "fp32", "model": "tiny-sd15",
                   "photos": list(SAMPLES)},
        "script": str(script), "versions": {"torch": torch.__version__,
                                            "diffusers": diffusers.__version__,
                                            "peft": peft.__version__},
        "median": med, "wall_ratio": round(wall, 3), "memory_ratio": round(memory, 3),
        # The bare loop's wall time over theirs: the best ratio any trainer on this stack
        # reaches for this recipe; ours over the bare loop: what our run adds to it.
        "floor_wall_ratio": round(med["floor"]["wall_s"] / med["theirs"]["wall_s"], 3),
        "ours_over_floor": round(med["ours"]["wall_s"] / med["floor"]["wall_s"], 3),
        "target": {"wall_ratio_at_most": 0.75, "memory_ratio_at_most": 1.0},
        "met": {"wall": wall <= 0.75, "memory": memory <= 1.0}, "runs": runs})


if __name__ == "__main__":
    main()
