"""Shared test fixtures: the real sample photos, and one tiny model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never use the network: hub loads fail at once instead of retrying for half a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

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


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Build tiny models into a per-session folder: tests never touch a user's cache."""
    os.environ.setdefault("HEADSHOT_KIT_CACHE", str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory, obama_photos) -> Path:
    """The three Obama photos run through the prepare stage with the tiny preset."""
    from headshot_kit.config import get_preset
    from headshot_kit.prepare import prepare_photos

    out = tmp_path_factory.mktemp("prepared")
    prepare_photos(obama_photos, out, get_preset("tiny").prepare)
    return out
