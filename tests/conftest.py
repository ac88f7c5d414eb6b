"""Shared test fixtures: the real sample photos, and one tiny model built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The public-domain sample photos (see data/samples/PROVENANCE.md)."""
    return SAMPLES


@pytest.fixture(scope="session")
def obama_photos() -> list[Path]:
    return [SAMPLES / n for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
