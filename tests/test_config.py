"""Settings: `--set NAME=VALUE` is read by each field's declared type, as transformers'
HfArgumentParser reads the same dataclass fields."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from headshot_kit import config

CONFIGS = (config.PrepareConfig, config.TrainConfig, config.GenerateConfig,
           config.EvaluateConfig)


def _samples(kind) -> list[tuple[str, list[str]]]:
    """Texts to parse for a field of this type: ours (V1,V2 for lists) and HfArgumentParser's
    words for the same value."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    kind = args[0] if len(args) == 1 else kind
    origin = typing.get_origin(kind)
    if kind is bool:
        return [(t, [t]) for t in ("true", "false", "yes", "no", "1", "0")]
    if kind is int:
        return [("7", ["7"]), ("-3", ["-3"])]
    if kind is float:
        return [("0.25", ["0.25"]), ("5e-4", ["5e-4"]), ("3", ["3"])]
    if kind is str:
        return [("fp16", ["fp16"]), ("a photo of {subject}", ["a photo of {subject}"])]
    if origin is list:
        item = typing.get_args(kind)[0]
        values = ["1", "2"] if item is int else ["corporate", "studio-white"]
        return [(",".join(values), values)]
    return []


def _read(get):
    """A setting's value as read, or the check that refused it (its sentence, which names
    the setting and the value read)."""
    try:
        return "read", get()
    except config.ConfigError as exc:
        return "refused", str(exc)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_set_reads_every_setting_as_hf_argument_parser_does(cls):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    types = typing.get_type_hints(cls)
    compared, tuples = 0, []
    for f in dataclasses.fields(cls):
        if typing.get_origin(types[f.name]) is tuple:
            tuples.append(f.name)  # HfArgumentParser has no reading for tuple fields
            continue
        samples = _samples(types[f.name])
        assert samples, f"{cls.__name__}.{f.name}: no sample for {types[f.name]}"
        for ours_text, words in samples:
            # A value outside the setting's range (rank=-3) is read alike and then refused
            # alike, by the same check, when either builds the config.
            ours = _read(lambda: getattr(config.update_config(cls(), {f.name: ours_text}),
                                         f.name))
            theirs = _read(lambda: getattr(
                parser.parse_args_into_dataclasses([f"--{f.name}", *words])[0], f.name))
            assert ours == theirs, (f.name, ours_text)
            compared += 1
    assert compared >= len(dataclasses.fields(cls)) - len(tuples)
    # Tuples are ours alone: "1,2" is a tuple of ints.
    for name in tuples:
        item = typing.get_args(types[name])[0]
        value = getattr(config.update_config(cls(), {name: "1,2"}), name)
        assert value == tuple(item(v) for v in ("1", "2"))


def test_none_and_bad_values_read_plainly():
    cfg = config.update_config(config.TrainConfig(snr_gamma=None), {"snr_gamma": "5.5"})
    assert cfg.snr_gamma == 5.5
    assert config.update_config(cfg, {"snr_gamma": "none"}).snr_gamma is None
    with pytest.raises(config.ConfigError, match="rank='four' is not a valid int"):
        config.update_config(cfg, {"rank": "four"})
    with pytest.raises(config.ConfigError, match="did you mean 'rank'"):
        config.update_config(cfg, {"rnak": "4"})
