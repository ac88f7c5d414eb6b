"""The host's memory: the collector spares older objects only within a block and forgets
nothing after it, and freed heap memory goes back to the system."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest

from headshot_kit.hostmem import collector_spares_older, return_freed_memory


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_older_objects_are_spared_within_the_block_and_collected_after_it():
    old = Node()
    alive = weakref.ref(old)
    with collector_spares_older():
        assert gc.get_freeze_count() > 0
        del old
        gc.collect()
        assert alive() is not None  # frozen: the block's passes do not walk it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None  # handed back to the collector when the block ended


def test_the_collector_gets_its_objects_back_when_the_block_fails():
    with pytest.raises(RuntimeError), collector_spares_older():
        raise RuntimeError("a failed run")
    assert gc.get_freeze_count() == 0


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_system():
    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MB in heap-sized blocks
    pin = bytearray(64 * 1024)  # above them on the heap: glibc cannot simply shrink its top
    del blocks
    before = _resident_mb()
    assert return_freed_memory()
    after = _resident_mb()
    assert before - after > 100, (before, after)
    del pin


def test_a_training_run_never_imports_pandas(prepared_dataset, tmp_path):
    """pandas alone holds 29 MB: a run writes its metrics and card without it, and makes its
    table only when asked (TrainResult.metrics)."""
    import subprocess

    script = f"""
import dataclasses, sys
from headshot_kit.config import get_preset
from headshot_kit.train import train_lora
cfg = dataclasses.replace(get_preset("tiny").train, steps=2, validate_every=0, device="cpu")
result = train_lora({str(prepared_dataset)!r}, {str(tmp_path / "lora")!r}, cfg, progress=False)
assert (result.out_dir / "metrics.csv").is_file() and (result.out_dir / "loss.png").is_file()
print("PANDAS", "pandas" in sys.modules)
print("ROWS", len(result.metrics))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PANDAS False" in out.stdout  # before anyone asked for the table
    assert "ROWS 2" in out.stdout


def test_closing_a_cpu_run_frees_its_models_without_a_full_collection(prepared_dataset,
                                                                     tmp_path):
    """Reference counting frees what a finished run held; a full collection (accelerate's
    free_memory runs one) would walk every object the process has, for nothing."""
    import dataclasses

    from headshot_kit.config import get_preset
    from headshot_kit.train import Trainer

    cfg = dataclasses.replace(get_preset("tiny").train, steps=1, validate_every=0,
                              checkpoint_every=0, device="cpu")
    trainer = Trainer(prepared_dataset, tmp_path / "lora", cfg, progress=False)
    trainer.run()
    held = [weakref.ref(x) for x in (trainer.pipe.unet, trainer.pipe.vae, trainer.optimizer)]
    full = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(info)

    gc.callbacks.append(count)
    gc.disable()  # nothing but close() may collect meanwhile
    try:
        trainer.close()
        assert full == []
        assert [ref() for ref in held] == [None, None, None]
    finally:
        gc.enable()
        gc.callbacks.remove(count)
