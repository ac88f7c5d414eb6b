"""The host's memory and the garbage collector during a run.

A training run holds the libraries' objects (torch, transformers and diffusers leave about
half a million behind their imports) and makes few of its own. Two habits of CPython and glibc
cost it time and memory it does not need to spend:

- The collector's full passes walk every object the process holds, however old: each pass
  costs about as much as importing a mid-sized library, and imports made late in a run (the
  loss plot's matplotlib, the face networks) set several off. `collector_spares_older` makes a
  pass walk only what the block itself made (`gc.freeze`), and hands the older objects back to
  the collector when the block ends, so nothing that becomes garbage later is kept for good.
- glibc keeps the memory Python and PyTorch free on its heap for reuse, so a process stays at
  its high-water mark: what encoding the photos or a training step held for a moment stays
  resident while the next stage loads (Colab's host has 12.7 GB). `return_freed_memory` hands
  it back (`malloc_trim`); where the C library has no such call it does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from contextlib import contextmanager


@contextmanager
def collector_spares_older():
    """Within the block, the garbage collector walks only the objects the block made."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc; absent from musl
    except OSError:
        return None


_TRIM = _malloc_trim()


def return_freed_memory() -> bool:
    """Hand the heap memory the process has freed back to the system; True if it could."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
