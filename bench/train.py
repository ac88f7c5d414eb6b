"""Training speed and memory on the CPU: steps per second and peak RSS for the tiny preset,
with and without cached latents. Writes results/bench/train.json.

Each variant runs in its own process so peak RSS is its own, three times, alternating, so a
busy moment of the machine does not favour one; medians of the per-step times. At the tiny
preset's 64 px the tiny VAE costs next to nothing, so the comparison also runs at 256 px,
where encoding every step shows.
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

STEPS, WARMUP, REPEATS = 40, 5, 3


def one_variant(cache_latents: bool, resolution: int) -> dict:
    from headshot_kit.config import get_preset
    from headshot_kit.prepare import prepare_photos
    from headshot_kit.train import Trainer

    preset = get_preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        photos = [ROOT / "data" / "samples" / "photos" / n
                  for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
        prepare_photos(photos, Path(tmp) / "data", preset.prepare)
        cfg = dataclasses.replace(preset.train, steps=STEPS + WARMUP, cache_latents=cache_latents,
                                  resolution=resolution)
        start = time.perf_counter()
        trainer = Trainer(Path(tmp) / "data", Path(tmp) / "lora", cfg)
        setup = time.perf_counter() - start
        times = []
        for _ in range(STEPS + WARMUP):
            t = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t)
        step = statistics.median(times[WARMUP:])
        return {"cache_latents": cache_latents, "resolution": resolution,
                "median_step_s": round(step, 4),
                "steps_per_s": round(1 / step, 2), "setup_s": round(setup, 2),
                "optimizer": trainer.optimizer_name, "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(one_variant(sys.argv[1] == "cached", int(sys.argv[2]))))
        return
    summary = {}
    for resolution in (64, 256):
        runs = {"cached": [], "uncached": []}
        for _ in range(REPEATS):
            for variant in runs:
                out = subprocess.run([sys.executable, __file__, variant, str(resolution)],
                                     capture_output=True, text=True, check=True).stdout
                runs[variant].append(json.loads(out.strip().splitlines()[-1]))
        med = {v: statistics.median(r["steps_per_s"] for r in rs) for v, rs in runs.items()}
        summary[f"{resolution}px"] = {
            "steps_per_s_cached": med["cached"], "steps_per_s_uncached": med["uncached"],
            "speedup_from_cached_latents": round(med["cached"] / med["uncached"], 2),
            "peak_rss_mb_cached": max(r["peak_rss_mb"] for r in runs["cached"]),
            "peak_rss_mb_uncached": max(r["peak_rss_mb"] for r in runs["uncached"]),
            "runs": runs}
    write_result("train", {"preset": "tiny", "steps_timed": STEPS, "repeats": REPEATS,
                           **summary})


if __name__ == "__main__":
    main()
