"""Styles: the prompt library, packaged (`headshot_kit/data/styles.yaml`) and the user's own.

A style is a prompt with `{subject}` where the trained words go, a negative prompt, and
suggested steps and guidance. A wrong style file is refused with the file, the style and the
field named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import yaml

# The fields a style may set: their types, and how an error message names those types.
STYLE_FIELDS = {"prompt": (str, "text"), "negative_prompt": (str, "text"),
                "guidance": ((int, float), "number"), "steps": (int, "whole number"),
                "description": (str, "text")}


_STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class StyleError(ValueError):
    """A style file is wrong; the message names the file, the style and the field."""


@dataclass(frozen=True)
class Style:
    name: str
    # Contains {subject}, which becomes "<token> <class>" (e.g. "ohwx person").
    prompt: str
    negative_prompt: str = ""
    # Suggested settings; used when GenerateConfig.style_settings is True.
    guidance: float | None = None
    steps: int | None = None
    description: str = ""
    # The file the style came from, so a surprising prompt can be traced.
    source: str = ""


def load_styles(extra_dirs: Iterable[str | Path] = ()) -> dict[str, Style]:
    """The packaged styles, then every *.yaml / *.yml in `extra_dirs` (a later name replaces)."""
    packaged = resources.files("headshot_kit") / "data" / "styles.yaml"
    styles = _read_style_file(Path(str(packaged)))
    for folder in extra_dirs:
        folder = Path(folder)
        if not folder.exists():
            raise StyleError(f"Style folder {folder} does not exist; check "
                             "GenerateConfig.style_dirs.")
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
        for path in files:
            styles.update(_read_style_file(path))
    return styles


def _read_style_file(path: Path) -> dict[str, Style]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StyleError(f"{path}: not valid YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise StyleError(f"{path}: expected a mapping of style names to fields, e.g. "
                         "'corporate: {prompt: \"headshot of {subject}, ...\"}'.")
    styles = {}
    for name, fields in data.items():
        # Keys starting with "_" hold shared text for YAML anchors, not styles.
        if str(name).startswith("_"):
            continue
        where = f"{path}: style {name!r}"
        if not _STYLE_NAME.match(str(name)):
            raise StyleError(f"{where}: the name must be lowercase letters, digits, '-' or '_' "
                             "(it becomes part of the image file names).")
        if not isinstance(fields, dict):
            raise StyleError(f"{where}: expected fields (prompt, negative_prompt, guidance, "
                             "steps, description) under the name.")
        for key, value in fields.items():
            if key not in STYLE_FIELDS:
                raise StyleError(f"{where}: unknown field {key!r}; valid fields: "
                                 f"{', '.join(STYLE_FIELDS)}.")
            types, type_name = STYLE_FIELDS[key]
            # YAML reads yes/no as booleans, which Python counts as ints.
            if isinstance(value, bool) or not isinstance(value, types):
                raise StyleError(f"{where}: field {key!r} is {value!r}; it must be "
                                 f"{type_name}.")
        if "{subject}" not in fields.get("prompt", ""):
            raise StyleError(f"{where}: field 'prompt' must contain {{subject}}, where the "
                             "trained token goes (e.g. 'headshot of {subject}, navy background').")
        for key in ("guidance", "steps"):
            if fields.get(key) is not None and fields[key] <= 0:
                raise StyleError(f"{where}: field {key!r} is {fields[key]}; it must be positive.")
        styles[name] = Style(name=name, source=str(path), **fields)
    return styles
