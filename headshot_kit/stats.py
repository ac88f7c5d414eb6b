"""Confidence intervals for sweeps: is one setting better than another, or was it the seed?

A run is judged on a few dozen generated images of one trained LoRA, and another training seed
gives another LoRA and other images, so a difference of two images in forty is often noise.
`seed_intervals(table, by=["rank"])` groups the experiments table's runs by the settings in
`by` (the runs of a group differ only in their training seed) and gives each group and metric a
95% percentile bootstrap interval (Efron and Tibshirani, "An Introduction to the Bootstrap",
1993), drawn in two stages as the data were made: first the group's runs, with replacement,
then the images within each drawn run. Resampling images alone would ignore that a whole run
can be lucky; resampling runs alone would ignore that a run's forty images are still a sample.

A group of one run (one training seed) gets its estimate and no interval (`low`, `high` left
empty): one seed cannot show what another would have done, and an interval over its images alone
would look like one that can. A metric's verdict names the best group only when its interval
lies wholly above every other group's; otherwise it says "no clear difference" (always, with
one seed per group). Every metric here is better when higher.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .records import read_experiments

# Experiments-table metric -> (the scores.csv column it is computed from, over which images).
# Images without a face have no likeness or consistency and are left out of those, as the
# run's summary does; they count as "not the same person" in the rate.
METRICS = {
    "same_person_rate": ("same_person", np.mean),
    "likeness_median": ("likeness", np.median),
    "consistency_mean": ("consistency", np.mean),
}
NO_CLEAR_DIFFERENCE = "no clear difference"


def bootstrap_interval(runs: Sequence[Sequence[float]], statistic=np.mean, level: float = 0.95,
                       n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` over the pooled images of `runs`, and its interval.

    `runs` holds one array of per-image values per run (training seed); NaNs are dropped. Each
    of the `n_boot` draws picks len(runs) runs with replacement, then, for each picked run in
    turn, as many of its images with replacement, all from one `numpy.random.default_rng(seed)`
    so the interval is the same every time. The interval spans the middle `level` of the
    draws' statistics (the percentile method).
    """
    kept = [a[~np.isnan(a)] for a in (np.asarray(r, dtype=float) for r in runs)]
    kept = [a for a in kept if len(a)]
    if not kept:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(len(kept), size=len(kept))
        draws[b] = statistic(np.concatenate(
            [kept[i][rng.integers(len(kept[i]), size=len(kept[i]))] for i in picked]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(statistic(np.concatenate(kept))), float(low), float(high)


def verdict(labels: Sequence[str], lows: Sequence[float], highs: Sequence[float],
            estimates: Sequence[float]) -> str:
    """The best group's label when its interval is above every other's, else no clear
    difference (also when there is nothing to compare)."""
    ok = [i for i in range(len(labels)) if not np.isnan(estimates[i])]
    if len(ok) < 2:
        return NO_CLEAR_DIFFERENCE
    best = max(ok, key=lambda i: estimates[i])
    if all(lows[best] > highs[i] for i in ok if i != best):
        return f"{labels[best]} is highest"
    return NO_CLEAR_DIFFERENCE


def _run_scores(out_dir: str) -> pd.DataFrame:
    path = Path(out_dir) / "scores.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so the run's images cannot be resampled; "
                                "re-run the sweep (or evaluate that run) to write it.")
    return pd.read_csv(path)


def seed_intervals(table: str | Path | pd.DataFrame, by: Sequence[str],
                   metrics: Sequence[str] = tuple(METRICS), level: float = 0.95,
                   n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per group of runs sharing the settings `by`, and per metric: the estimate, its
    bootstrap interval (`low`, `high`), how many runs and images it rests on, and the metric's
    verdict (the same on each of its rows).

    `table` is the experiments table (its `out_dir` column points at each run's scores).
    """
    data = table if isinstance(table, pd.DataFrame) else read_experiments(table)
    by = list(by)
    missing = [c for c in [*by, "out_dir"] if c not in data.columns]
    unknown = [m for m in metrics if m not in METRICS]
    if missing or unknown:
        raise ValueError(f"Cannot compute intervals: the experiments table has no "
                         f"{', '.join(missing + unknown)}; intervals exist for "
                         f"{', '.join(METRICS)} over the table's settings.")
    scores = {d: _run_scores(d) for d in data["out_dir"]}
    groups = list(data.groupby(by, sort=True)) if by else [((), data)]
    rows = []
    for metric in metrics:
        column, statistic = METRICS[metric]
        block = []
        for key, runs in groups:
            key = key if isinstance(key, tuple) else (key,)
            values = [scores[d][column].astype(float).to_numpy() if column in scores[d]
                      else np.array([]) for d in runs["out_dir"]]
            estimate, low, high = bootstrap_interval(values, statistic, level, n_boot, seed)
            if len(runs) < 2:  # no second seed: no interval over seeds to give
                low = high = np.nan
            block.append({**dict(zip(by, key)), "metric": metric, "estimate": estimate,
                          "low": low, "high": high, "n_runs": len(runs),
                          "n_images": int(sum(np.isfinite(v).sum() for v in values))})
        labels = [" ".join(f"{c}={r[c]}" for c in by) or "all" for r in block]
        said = verdict(labels, [r["low"] for r in block], [r["high"] for r in block],
                       [r["estimate"] for r in block])
        rows += [{**r, "verdict": said} for r in block]
    return pd.DataFrame(rows)
