"""The `headshot-kit` command: the notebooks' stages from a terminal.

Each subcommand builds the same config objects as the notebooks: a preset, then a config file's
section for that stage (`--config settings.yaml`), then `--set name=value` pairs and the named
flags. Wrong settings stop the command before any model is loaded, with a sentence saying what
to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import typing
from pathlib import Path
from typing import Any

from .config import (PRESETS, ConfigError, DataError, EvaluateConfig, GenerateConfig,
                     PrepareConfig, RunFailed, TrainConfig, get_preset, update_config)
from .models import ModelUnavailable
from .sweep import SweepError


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each setting's comment, as written above its field in config.py: the one text that
    the CLI's `--help` shows beside the setting."""
    import inspect

    docs, comment, previous = {}, [], ""
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("# ").strip())
            continue
        name = text.split(":", 1)[0]
        if ":" in text and name.isidentifier() and not text.startswith(("def ", "@")):
            # A pair such as eyes_warn / eyes_fail shares the comment above the first.
            if not comment and previous and previous.rsplit("_", 1)[0] == name.rsplit("_", 1)[0]:
                docs[name] = docs[previous]
            else:
                docs[name] = " ".join(comment)
            previous = name
        comment = []
    return docs

def settings_help(cls: type, preset: str | None = None) -> str:
    """Every setting of a stage config with its type, value and comment, for `--help`: the
    values `preset` sets (what the command runs), or the dataclass defaults without one."""
    import textwrap

    types, docs = typing.get_type_hints(cls), field_docs(cls)
    stage = {PrepareConfig: "prepare", TrainConfig: "train", GenerateConfig: "generate",
             EvaluateConfig: "evaluate"}[cls]
    defaults = getattr(get_preset(preset), stage) if preset else cls()
    lines = [f"settings (--set NAME=VALUE; lists as V1,V2), as preset {preset} sets them "
             "(--preset NAME --help shows another's):" if preset
             else f"settings (--set NAME=VALUE; lists as V1,V2), {cls.__name__} defaults:"]
    for f in dataclasses.fields(cls):
        kind = getattr(types[f.name], "__name__", str(types[f.name]))
        lines.append(f"  {f.name} = {getattr(defaults, f.name)!r} ({kind})")
        if docs.get(f.name):
            lines += textwrap.wrap(docs[f.name], width=92, initial_indent="      ",
                                   subsequent_indent="      ")
    return "\n".join(lines)

def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML settings file into a plain dict (sections: prepare/train/...)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; check the path.")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # both parsers raise their own error types
        raise ConfigError(f"Config file {path} could not be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of settings.")
    return data


def _stage_config(args, stage: str, flags: dict):
    """The preset's config for `stage`, then the config file, then --set, then flags."""
    cfg = getattr(get_preset(args.preset), stage)
    if getattr(args, "config", None):
        data = load_config_file(args.config)
        cfg = update_config(cfg, data.get(stage, {}), source=f"{args.config} [{stage}]")
    pairs = {}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as name=value, e.g. --set rank=8.")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    cfg = update_config(update_config(cfg, pairs, source="--set"), flags, source="command line")
    print(_banner(args, cfg), file=sys.stderr, flush=True)  # what runs, settings applied
    return cfg


def _banner(args, cfg) -> str:
    """The first line a stage command prints: which preset runs, and on which model."""
    if isinstance(cfg, EvaluateConfig):
        what = f"embedder {cfg.embedder}"
    else:
        what = f"{getattr(cfg, 'model', None) or get_preset(args.preset).train.model}, " \
               f"{cfg.resolution} px"
        what += f", {cfg.steps} steps" if isinstance(cfg, TrainConfig) else ""
    return f"headshot-kit {args.command}: preset {args.preset} ({what})"


def _needs_gpu(args, cfg) -> None:
    """A preset for a GPU's model, about to run on a machine without one, is refused with the
    way out: a minute's wait would end in hours of CPU work or a failed download."""
    import torch

    if get_preset(args.preset).needs_download and cfg.device == "auto" and \
            not torch.cuda.is_available():
        raise ConfigError(
            f"preset {args.preset} runs {cfg.model} on a GPU, and this machine has none (no "
            "CUDA device). Run it where there is one (a free Colab T4 will do), or add "
            "--preset tiny to run every stage offline on this CPU (it proves the plumbing; it "
            "draws no real faces). --set device=cpu runs it here anyway, very slowly.")


def _preset_in(argv: list[str] | None) -> str:
    """The preset named on the command line (so --help can show its values), or the default."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1] if argv[i + 1] in PRESETS else DEFAULT_PRESET
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1] if arg.split("=", 1)[1] in PRESETS else DEFAULT_PRESET
    return DEFAULT_PRESET


# The stage commands run what a user's photos need: the SD 1.5 preset for a Colab T4 (a
# machine without a GPU is told to add --preset tiny); the demo runs the tiny preset.
DEFAULT_PRESET = "sd15-t4"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"named settings (default {DEFAULT_PRESET}): sd15-t4, sdxl-t4 (a GPU such "
                   "as Colab's T4), tiny (offline on any CPU, plumbing only)")
    p.add_argument("--config", help="a YAML or JSON file with prepare/train/generate/evaluate "
                   "sections of settings")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="override one setting of this stage (repeatable)")


def _stage_parser(sub, name: str, cfg_class: type, help: str,
                  preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """A subcommand whose --help lists every setting of its stage as `preset` sets it, with the
    comment that documents it in config.py (one text, shown in both places)."""
    return sub.add_parser(name, help=help, epilog=settings_help(cfg_class, preset),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headshot-kit",
        description="Turn 5-20 selfies into professional headshots, and score them.")
    sub = parser.add_subparsers(dest="command", required=True)
    preset = _preset_in(argv)

    p = _stage_parser(sub, "prepare", PrepareConfig,
                      help="check, crop and caption selfies into a dataset", preset=preset)
    p.add_argument("--photos", required=True, help="a folder, a .zip, or one image file")
    p.add_argument("--out", required=True, help="the dataset folder to write")
    _common(p)

    p = sub.add_parser("purge", help="delete a subject's uploads, prepared photos, LoRA "
                       "weights, checkpoints and headshots")
    p.add_argument("paths", nargs="+", help="the folders (or files) to delete, e.g. a workdir")
    p.add_argument("--older-than-days", type=float,
                   help="only delete what is older than this many days")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted")

    p = _stage_parser(sub, "train", TrainConfig, help="fine-tune a LoRA on a prepared dataset",
                      preset=preset)
    p.add_argument("--data", required=True, help="the prepare stage's output folder")
    p.add_argument("--out", required=True, help="the folder for the LoRA and its records")
    p.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    _common(p)

    p = _stage_parser(sub, "generate", GenerateConfig, help="render headshots with a trained LoRA",
                      preset=preset)
    p.add_argument("--lora", help="the train stage's output folder (omit for the base model)")
    p.add_argument("--out", required=True, help="the folder for the images")
    p.add_argument("--styles", nargs="+", help="style names (default: the preset's)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's)")
    p.add_argument("-n", type=int, dest="n", help="number of seeds per style (0..n-1)")
    _common(p)

    p = _stage_parser(sub, "evaluate", EvaluateConfig,
                      help="score likeness, quality and consistency", preset=preset)
    p.add_argument("--references", required=True, help="photos of the person (e.g. the "
                   "prepared dataset's images/ folder)")
    p.add_argument("--images", required=True, help="the generate stage's output folder")
    p.add_argument("--out", required=True, help="the folder for the scores")
    _common(p)

    p = _stage_parser(sub, "fitcheck", TrainConfig, help="predict peak GPU memory, step time "
                      "and host RAM of a training run, without a GPU", preset=preset)
    p.add_argument("--gpu", default="t4", help="t4, l4, a10g, a100-40g, a100-80g, h100 or a "
                   "torch.cuda device name")
    p.add_argument("--full", action="store_true", help="plan a full UNet fine-tune, not a LoRA")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _common(p)

    p = sub.add_parser("sweep", help="train, generate and evaluate every combination of "
                       "settings, then compare them")
    p.add_argument("--data", required=True, help="the prepare stage's output folder")
    p.add_argument("--out", required=True, help="one folder per run, plus experiments.csv")
    p.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2",
                   help="a train or generate setting and its values (repeatable), "
                   "e.g. --grid rank=4,16 --grid lr=1e-4,5e-5")
    p.add_argument("--seeds", nargs="+", type=int, help="generation seeds for every run")
    p.add_argument("--train-seeds", nargs="+", type=int, help="repeat every combination with "
                   "these training seeds, for confidence intervals over seeds and images")
    p.add_argument("--ray", metavar="ADDRESS", help="run the jobs on a Ray cluster, one GPU "
                   "each: auto (the cluster this machine is in) or ray://host:10001; --data "
                   "and --out must be folders every node sees")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their predicted "
                   "GPU hours (from the fit check's step time) without running them")
    p.add_argument("--gpu", default="t4", help="the GPU the --dry-run estimate is for (as in "
                   "fitcheck)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"named settings every run starts from (default {DEFAULT_PRESET})")

    p = sub.add_parser("lab", help="JupyterLab on working copies of the notebooks (git-ignored "
                       "results/notebooks/ in a checkout), so running and saving them never "
                       "changes the tracked ones")
    p.add_argument("--dir", help="where the working copies live (default: results/notebooks)")
    p.add_argument("jupyter_args", nargs=argparse.REMAINDER,
                   help="passed to jupyter lab after --, e.g. -- --port=8889")

    p = sub.add_parser("demo", help="run all four stages on the bundled sample photos")
    p.add_argument("--out", default="results/demo", help="where every artifact goes")
    p.add_argument("--photos", help="photos to use instead of the bundled samples")
    p.add_argument("--notebooks", action="store_true",
                   help="run the four stage notebooks headless instead of the library calls")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    return parser


def run(args) -> int:
    if args.command == "prepare":
        from .prepare import prepare_photos

        cfg = _stage_config(args, "prepare", {})
        result = prepare_photos(args.photos, args.out, cfg)
        for line in result.advice:
            print(line)
        print(f"{result.n_used} photo{'' if result.n_used == 1 else 's'} prepared in {args.out} "
              f"(report: {args.out}/report.csv)")
    elif args.command == "purge":
        from .storage import purge

        purge(args.paths, args.older_than_days, dry_run=args.dry_run)
    elif args.command == "train":
        from .train import train_lora

        from .config import validate_train

        cfg = validate_train(_stage_config(args, "train", {"steps": args.steps}))
        _needs_gpu(args, cfg)
        result = train_lora(args.data, args.out, cfg)
        print(f"LoRA written to {result.lora_path}")
    elif args.command == "generate":
        from .generate import generate_pack

        seeds = list(range(args.n)) if args.n else args.seeds
        from .config import validate_generate

        cfg = validate_generate(_stage_config(args, "generate",
                                              {"styles": args.styles, "seeds": seeds}))
        _needs_gpu(args, cfg)
        result = generate_pack(args.lora, args.out, cfg)
        print(f"{len(result.manifest)} images written to {result.out_dir} (grid: grid.png)")
    elif args.command == "evaluate":
        from .evaluate import evaluate_images

        cfg = _stage_config(args, "evaluate", {})
        result = evaluate_images(args.references, args.images, args.out, cfg)
        print(result.headline)
    elif args.command == "fitcheck":
        from .fitcheck import fitcheck_cli

        # Exit status 1 when the plan does not fit, so scripts can stop there.
        return fitcheck_cli(_stage_config(args, "train", {}), args.gpu, as_json=args.json,
                            mode="full" if args.full else "lora", preset=args.preset)
    elif args.command == "sweep":
        return _sweep(args)
    elif args.command == "lab":
        import subprocess

        from .demo import working_notebooks

        folder = working_notebooks(args.dir)
        extra = [a for a in args.jupyter_args if a != "--"]
        print(f"JupyterLab on {folder} (copies of the notebooks: run and save them freely).",
              flush=True)
        return subprocess.call([sys.executable, "-m", "jupyterlab", *extra], cwd=folder)
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, preset=args.preset, photos=args.photos, notebooks=args.notebooks)
    return 0


def _sweep(args) -> int:
    from .records import experiments_table
    from .stats import seed_intervals
    from .sweep import cost_summary, estimate_cost, parse_grid, plan_runs, sweep

    grid = parse_grid(args.grid)
    train = get_preset(args.preset).train
    print(_banner(args, train), file=sys.stderr, flush=True)
    if not args.dry_run and not args.ray:  # a cluster's nodes have the GPUs, not this one
        _needs_gpu(args, train)
    if args.dry_run:
        cost = estimate_cost(plan_runs(args.preset, grid, args.seeds, args.train_seeds),
                             args.gpu)
        print(cost.to_string(index=False, float_format="{:.2f}".format))
        print(cost_summary(cost, args.gpu))
        return 0
    table = sweep(args.data, args.out, preset=args.preset, grid=grid, seeds=args.seeds,
                  train_seeds=args.train_seeds, ray=args.ray)
    print(f"{len(table)} runs in {experiments_table(args.out)}")
    if args.train_seeds and len(args.train_seeds) > 1:
        intervals = seed_intervals(table, list(grid))
        print(intervals.to_string(index=False, float_format="{:.3f}".format))
    return 0


def os_error_text(exc: OSError) -> str:
    """A failed read or write as one sentence: what happened, to which file, what to do."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full{where}: free some space, or write to a folder on a larger "
                "disk, and run the command again (what was written before is kept).")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"not allowed to write or read{where}: choose a folder you can write to, or "
                "fix its permissions.")
    return f"{exc}. Check the file (is it complete and readable?) and run the command again."


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure a user can meet (a wrong setting, a missing or damaged
    file, a full disk, a diverged run) ends in one line and exit status 2; a traceback means a
    bug in headshot-kit."""
    args = build_parser(argv).parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError, FileNotFoundError, ModelUnavailable, SweepError,
            RunFailed) as exc:
        message = str(exc)
    except OSError as exc:  # a full disk, a damaged photo (PIL's errors are OSErrors)
        message = os_error_text(exc)
    print(f"headshot-kit {args.command}: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
