"""Training speed and memory on the CPU: steps per second and peak RSS for the tiny preset,
with and without cached latents. Writes results/bench/train.json.

Each variant runs in its own process so peak RSS is its own. Medians over timed windows.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, peak_rss_mb, write_result

STEPS, WARMUP = 40, 5


def one_variant(cache_latents: bool) -> dict:
    from headshot_kit.config import get_preset
    from headshot_kit.prepare import prepare_photos
    from headshot_kit.train import Trainer

    preset = get_preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        photos = [ROOT / "data" / "samples" / n for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
        prepare_photos(photos, Path(tmp) / "data", preset.prepare)
        cfg = dataclasses.replace(preset.train, steps=STEPS + WARMUP, cache_latents=cache_latents)
        start = time.perf_counter()
        trainer = Trainer(Path(tmp) / "data", Path(tmp) / "lora", cfg)
        setup = time.perf_counter() - start
        times = []
        for _ in range(STEPS + WARMUP):
            t = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t)
        step = statistics.median(times[WARMUP:])
        return {"cache_latents": cache_latents, "median_step_s": round(step, 4),
                "steps_per_s": round(1 / step, 2), "setup_s": round(setup, 2),
                "optimizer": trainer.optimizer_name, "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(one_variant(sys.argv[1] == "cached")))
        return
    runs = []
    for variant in ("cached", "uncached"):
        out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True,
                             check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    cached, uncached = runs
    write_result("train", {
        "preset": "tiny", "steps_timed": STEPS, "runs": runs,
        "speedup_from_cached_latents": round(cached["steps_per_s"] / uncached["steps_per_s"], 2),
    })


if __name__ == "__main__":
    main()
