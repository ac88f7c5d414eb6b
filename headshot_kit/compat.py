"""Do the installed libraries work together? Asked once before any model is loaded.

diffusers, transformers, peft and accelerate move fast and depend on each other's newest
releases, and pip checks only what each package declares. transformers' LoRA support, for
one, needs a minimum peft that it declares nowhere and checks only when a text encoder first
gets an adapter: minutes into a run, as a ValueError deep in a notebook cell. This module
reads every such need from the libraries themselves and turns a mismatch into one sentence
naming the pair and the command that fixes it.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

# The libraries a run stands on; their declared needs among each other are checked too.
STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes",
         "huggingface-hub", "safetensors", "tokenizers", "numpy")
REPO = "https://github.com/headshot-kit/headshot-kit"
LOCK_URL = "https://raw.githubusercontent.com/headshot-kit/headshot-kit/main/requirements.lock"
# Every version the test suite ran with, torch left to the machine. On Colab and Kaggle the
# notebooks' setup cell installs the same set without touching what the runtime stands on.
TESTED_SET = (f'pip install -c {LOCK_URL} "headshot-kit[notebooks,dlib] @ git+{REPO}" (on '
              "Colab or Kaggle: the notebook's setup cell, in a new runtime)")


class IncompatibleVersions(RuntimeError):
    """Installed libraries that cannot work together; the message says how to fix it."""


@dataclass(frozen=True)
class Need:
    """`package` (at `version`) needs `needed` to satisfy `spec`."""

    package: str
    version: str
    needed: str
    spec: str


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def installed_versions(names=STACK) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[_canonical(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _declared(dist: str, version: str) -> list[Need]:
    """What an installed distribution declares it needs (extras left out)."""
    needs = []
    for line in metadata.requires(dist) or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if str(req.specifier):
            needs.append(Need(dist, version, _canonical(req.name), str(req.specifier)))
    return needs


def _runtime_floors(versions: dict[str, str]) -> list[Need]:
    """Floors the libraries check only at run time, read from the libraries themselves."""
    needs = []
    if "transformers" in versions:
        try:
            from transformers.integrations import peft as tf_peft

            needs.append(Need("transformers", versions["transformers"], "peft",
                              f">={tf_peft.MIN_PEFT_VERSION}"))
        except (ImportError, AttributeError):
            pass
    if "diffusers" in versions:
        try:
            from diffusers.utils import constants

            needs.append(Need("diffusers", versions["diffusers"], "peft",
                              f">={constants.MIN_PEFT_VERSION}"))
            needs.append(Need("diffusers", versions["diffusers"], "transformers",
                              f">={constants.MIN_TRANSFORMERS_VERSION}"))
        except (ImportError, AttributeError):
            pass
    return needs


def library_needs(versions: dict[str, str]) -> list[Need]:
    """Every need that the workbench and its stack declare or check, for the installed set."""
    needs = []
    for dist in ("headshot-kit", *versions):
        try:
            version = versions.get(dist) or metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue  # a checkout run without installing: nothing declared to read
        needs += [n for n in _declared(dist, version) if n.needed in STACK]
    return needs + _runtime_floors(versions)


def _fix(need: Need) -> str:
    return f"pip install -U '{need.needed}{need.spec}'"


def check_versions(versions: dict[str, str], needs: list[Need]) -> list[str]:
    """One sentence per unmet need: who needs what, what is installed, and the fix."""
    problems = []
    for need in needs:
        have = versions.get(need.needed)
        if have is None or SpecifierSet(need.spec).contains(have, prereleases=True):
            continue
        # ">=0.22,<1" -> ">= 0.22, < 1": a space after each operator, two-character ones whole.
        spec = re.sub(r"(~=|===|==|!=|<=|>=|<|>)\s*", r"\1 ", need.spec).replace(",", ", ")
        problems.append(f"{need.package} {need.version} needs {need.needed} {spec}; installed "
                        f"{have}: {_fix(need)}, or install the tested set: {TESTED_SET}")
    return list(dict.fromkeys(problems))


@functools.cache
def hide_unusable_torchao() -> str | None:
    """Leave an installed torchao that peft refuses out of this session; the sentence saying
    so, or None when there was nothing to hide.

    peft (0.19 and later) raises "Found an incompatible version of torchao" whenever a LoRA
    attaches if the installed torchao is older than it supports, and Colab ships torchao 0.10.
    The workbench quantizes nothing with torchao, so the old one is hidden (a `None` entry in
    sys.modules: `import torchao` fails and find_spec finds nothing, the "not installed" that
    peft, diffusers and transformers all handle) rather than upgraded: torchao is built
    against one torch release (0.17 for torch 2.10, 0.18 needs 2.11), and the runtime's torch
    stays as it is.
    """
    try:
        from peft import import_utils
    except ImportError:
        return None
    available = getattr(import_utils, "is_torchao_available", None)
    if available is None or "torchao" in sys.modules:
        return None
    try:
        available()
        return None
    except ImportError as exc:
        reason = str(exc).splitlines()[0]
    sys.modules["torchao"] = None
    if hasattr(available, "cache_clear"):
        available.cache_clear()
    note = (f"torchao {metadata.version('torchao')} is installed but peft "
            f"{metadata.version('peft')} refuses it ({reason}); the workbench does not use "
            "torchao, so this session leaves it out.")
    print(note)
    return note


@functools.cache
def _checked() -> None:
    hide_unusable_torchao()
    versions = installed_versions()
    problems = check_versions(versions, library_needs(versions))
    if problems:
        raise IncompatibleVersions(" ".join(problems) + " Then restart the runtime/kernel.")


def require_compatible() -> None:
    """Raise IncompatibleVersions, one sentence per problem, before a run starts."""
    _checked()
