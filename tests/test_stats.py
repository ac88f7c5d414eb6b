"""Confidence intervals over training seeds and images: checked against answers known exactly,
against a hand-written bootstrap, and against the normal approximation; and the verdict names a
winner only when the intervals are apart."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from headshot_kit.evaluate import compare
from headshot_kit.stats import NO_CLEAR_DIFFERENCE, bootstrap_interval, seed_intervals


def test_identical_values_give_a_zero_width_interval():
    assert bootstrap_interval([[0.7] * 5, [0.7] * 8]) == (0.7, 0.7, 0.7)


def test_seeds_are_resampled_not_only_images():
    # Each run's images agree, the runs do not: a bootstrap over images alone would give a
    # zero-width interval. Drawing two runs with replacement gives means 0, 0.5 or 1.
    estimate, low, high = bootstrap_interval([[0.0] * 10, [1.0] * 10])
    assert (estimate, low, high) == (0.5, 0.0, 1.0)


def test_interval_matches_a_hand_written_two_stage_bootstrap():
    rng = np.random.default_rng(7)
    runs = [rng.normal(0.6, 0.1, 12), rng.normal(0.5, 0.1, 9), rng.normal(0.55, 0.1, 15)]

    draw = np.random.default_rng(3)
    medians = []
    for _ in range(500):
        seeds = draw.integers(3, size=3)
        images = [runs[s][draw.integers(len(runs[s]), size=len(runs[s]))] for s in seeds]
        medians.append(np.median(np.concatenate(images)))
    expected = (np.median(np.concatenate(runs)), *np.percentile(medians, [2.5, 97.5]))

    assert bootstrap_interval(runs, np.median, n_boot=500, seed=3) == pytest.approx(expected)


def test_one_run_of_many_images_agrees_with_the_normal_approximation():
    values = np.random.default_rng(1).uniform(0, 1, 400)
    estimate, low, high = bootstrap_interval([values], n_boot=4000)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert estimate == pytest.approx(values.mean())
    assert low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.15 * half)


def _fixture_table(tmp_path, per_rank: dict[int, list[list[float]]]) -> pd.DataFrame:
    """An experiments table with one run per (rank, seed) whose scores.csv holds `likeness`."""
    rows = []
    for rank, seeds in per_rank.items():
        for seed, likeness in enumerate(seeds):
            folder = tmp_path / f"rank={rank}_train_seed={seed}" / "scores"
            folder.mkdir(parents=True)
            likeness = np.array(likeness)
            pd.DataFrame({"likeness": likeness, "same_person": likeness > 0.5,
                          "consistency": likeness}).to_csv(folder / "scores.csv", index=False)
            rows.append({"run_id": folder.parent.name, "rank": rank, "train_seed": seed,
                         "likeness_median": np.median(likeness),
                         "same_person_rate": (likeness > 0.5).mean(),
                         "consistency_mean": likeness.mean(), "out_dir": str(folder)})
    return pd.DataFrame(rows)


def test_overlapping_settings_are_no_clear_difference(tmp_path):
    noisy = np.random.default_rng(0)
    table = _fixture_table(tmp_path, {
        4: [noisy.uniform(0.3, 0.8, 10).tolist() for _ in range(2)],
        16: [noisy.uniform(0.35, 0.85, 10).tolist() for _ in range(2)]})
    found = seed_intervals(table, ["rank"])
    assert set(found["metric"]) == {"same_person_rate", "likeness_median", "consistency_mean"}
    likeness = found[found["metric"] == "likeness_median"].set_index("rank")
    assert likeness.loc[4, "high"] > likeness.loc[16, "low"]  # the intervals overlap
    assert set(likeness["verdict"]) == {NO_CLEAR_DIFFERENCE}
    assert list(likeness["n_runs"]) == [2, 2] and list(likeness["n_images"]) == [20, 20]
    assert seed_intervals(table, ["rank"]).equals(found)  # the same draws every time


def test_separated_settings_name_the_winner_and_compare_draws_the_intervals(tmp_path):
    table = _fixture_table(tmp_path, {
        4: [[0.30, 0.32, 0.35, 0.31], [0.33, 0.29, 0.34, 0.30]],
        16: [[0.70, 0.72, 0.69, 0.74], [0.71, 0.73, 0.68, 0.70]]})
    found = seed_intervals(table, ["rank"], ["likeness_median"])
    assert found["low"].iloc[1] > found["high"].iloc[0]
    assert set(found["verdict"]) == {"rank=16 is highest"}

    fig = compare(table, "rank", "likeness_median")
    ax = fig.axes[0]
    assert "rank=16 is highest" in ax.get_title()
    (bars,) = [c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
    segments = bars.lines[2][0].get_segments()
    spans = np.array([(seg[0][1], seg[1][1]) for seg in segments])
    np.testing.assert_allclose(spans, found[["low", "high"]].to_numpy())


def test_one_training_seed_gives_an_estimate_and_no_interval(tmp_path):
    """With one run per setting there is no spread over seeds to show: no interval (it once
    printed a "95% interval" with n_runs 1 and low = high), and no winner."""
    table = _fixture_table(tmp_path, {4: [[0.2, 0.4, 0.6]], 8: [[0.7, 0.8, 0.9]]})
    intervals = seed_intervals(table, ["rank"], ["likeness_median"])
    assert list(intervals["n_runs"]) == [1, 1]
    assert list(intervals["estimate"]) == [0.4, 0.8]
    assert intervals["low"].isna().all() and intervals["high"].isna().all()
    assert set(intervals["verdict"]) == {NO_CLEAR_DIFFERENCE}
