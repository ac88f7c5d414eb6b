"""Writing results so that nothing good is ever lost.

Every file a stage writes goes to a temporary name in the same folder first and is renamed into
place when complete, so a crash or a Colab disconnect leaves either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def atomic_path(path: str | Path,
                same: Callable[[Path, Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    With `same`, an existing `path` for which `same(new, old)` holds is kept as it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if same is None or not (path.is_file() and same(tmp, path)):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path`.

    An existing `path` is replaced only after the new folder is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)



def safetensors_digest(path: str | Path) -> str:
    """A fingerprint of a .safetensors file's content: tensor names, dtypes, shapes, values
    and metadata, in sorted order.

    The file's bytes are no fingerprint: safetensors writes its metadata header in hash-map
    order, which changes from one write to the next, so the same weights saved twice differ.
    """
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def same_safetensors(new: Path, old: Path) -> bool:
    """For `atomic_path(..., same=...)`: a re-run that trained nothing rewrites no weights."""
    return safetensors_digest(new) == safetensors_digest(old)
