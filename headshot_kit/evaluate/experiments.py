"""Experiments: one row per evaluated run in a table, and any metric plotted against any
setting, with confidence intervals over seeds and images (headshot_kit.stats) where they exist.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..config import config_hash, to_dict
from ..records import experiments_table, read_experiments, write_experiments
from ..stats import METRICS as INTERVAL_METRICS
from ..stats import seed_intervals

if TYPE_CHECKING:
    from . import EvalResult

PathLike = str | Path

# Runs evaluated outside a work folder or a sweep (records.experiments_table).
EXPERIMENTS_TABLE = experiments_table()


def record_experiment(result: EvalResult, run_id: str | None = None,
                      settings: dict[str, Any] | None = None,
                      table: PathLike = EXPERIMENTS_TABLE) -> pd.DataFrame:
    """Add (or, for a run id already there, replace) one row for `result` in `table`.

    The row holds the run id, a hash of the evaluation config and settings, the settings as
    columns and the overall summary's metrics. Returns the whole table.
    """
    table = Path(table)
    run_id = run_id or result.run_id
    settings = {**result.settings, **(settings or {})}
    overall = result.summary.iloc[0]
    metrics = {k: v for k, v in overall.items() if k not in ("group", "notes", "odd_one_out")}
    clashes = sorted(set(settings) & (set(metrics) | {"run_id", "recorded", "config_hash",
                                                      "embedder", "out_dir"}))
    if clashes:
        raise ValueError(f"setting name(s) {', '.join(clashes)} clash with the experiments "
                         "table's own columns; rename them.")
    fingerprint = config_hash({"evaluate": to_dict(result.config), "settings": settings})
    row = {"run_id": run_id, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "config_hash": fingerprint,
           "embedder": result.embedder, **settings, **metrics, "out_dir": str(result.out_dir)}
    old = read_experiments(table, missing_ok=True)
    if "run_id" in old.columns:
        old = old[old["run_id"].astype(str) != str(run_id)]
    new = pd.DataFrame([row])
    updated = new if old.empty else pd.concat([old, new], ignore_index=True)
    write_experiments(updated, table)
    return updated


def compare(table: PathLike | pd.DataFrame, setting: str, metric: str, ax=None):
    """Plot `metric` against `setting` over the runs in the experiments table.

    Each dot is a run. For the same-person rate, median likeness and consistency the line joins
    each setting value's estimate over all its runs' images, the bars are its 95% bootstrap
    interval over runs (seeds) and images (headshot_kit.stats), and the title gives the
    verdict. For other metrics the line joins the runs' mean and the bars span one standard
    deviation.
    """
    import matplotlib.pyplot as plt

    data = table if isinstance(table, pd.DataFrame) else read_experiments(table)
    for name, what in ((setting, "setting"), (metric, "metric")):
        if name not in data.columns:
            raise ValueError(f"The experiments table has no {what} {name!r}; its columns are "
                             f"{', '.join(map(str, data.columns))}.")
    with_intervals = metric in INTERVAL_METRICS and "out_dir" in data.columns
    intervals = (seed_intervals(data.dropna(subset=[setting]), [setting], [metric])
                 if with_intervals else None)
    data = data[[setting, metric]].dropna()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    numeric = pd.api.types.is_numeric_dtype(data[setting])
    values = sorted(data[setting].unique()) if numeric else list(dict.fromkeys(data[setting]))
    xs = values if numeric else list(range(len(values)))
    ax.scatter([xs[values.index(v)] for v in data[setting]], data[metric], alpha=0.5, s=20,
               label="runs")
    title = f"{metric} vs {setting} ({len(data)} runs)"
    if intervals is not None:
        found = intervals.set_index(setting).reindex(values)
        ax.errorbar(xs, found["estimate"], marker="o", capsize=4, color="black",
                    yerr=[(found["estimate"] - found["low"]).fillna(0),
                          (found["high"] - found["estimate"]).fillna(0)],
                    label="95% interval (bootstrap over seeds and images)")
        title += f": {intervals['verdict'].iloc[0]}"
    else:
        stats = data.groupby(setting)[metric].agg(["mean", "std"]).reindex(values)
        ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=4,
                    color="black", label="mean ± 1 s.d.")
    # Ticks at the values that ran, only: a sweep over rank 4 and 8 has no rank 4.5.
    ax.set_xticks(xs, [f"{v:g}" if numeric else str(v) for v in values])
    ax.set_xlabel(setting)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure
