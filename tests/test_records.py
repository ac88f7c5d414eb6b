"""One reader and one writer per file on disk, and one definition per rule.

The LoRA's record (its config.json) is headshot_kit.lora's; a pack's manifest, a run's metrics
and the experiments table are headshot_kit.records' (their file names are headshot_kit.layout's).
The source scans below fail when a second module starts reading one of those files itself, or
writes a rule (the LoRA's target layers, the latent grid's multiple of 8, the face detector's
upsampling retry, the photo suffixes) a second time. The round trips check that each writer's
file reads back as written, and that a file missing a column is refused in one line naming it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "headshot_kit"


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _strings(tree: ast.AST) -> list[str]:
    """The string constants of the code (not its docstrings)."""
    skip = _docstrings(tree)
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def _naming(filename: str) -> set[str]:
    return {name for name, tree in _modules().items() if filename in _strings(tree)}


@pytest.mark.parametrize("filename", ["manifest.csv", "metrics.csv", "experiments.csv"])
def test_each_table_file_is_named_in_the_layout_only(filename):
    """A module that spells the file's name is about to read or write it on its own."""
    assert _naming(filename) == {"headshot_kit.layout"}


def test_the_tables_are_joined_to_a_folder_in_records_only():
    """Where each table lives (`folder / MANIFEST`) is decided by headshot_kit.records."""
    names = {"MANIFEST", "METRICS", "EXPERIMENTS"}
    joins = sorted(f"{module}: {ast.unparse(node)}" for module, tree in _modules().items()
                   for node in ast.walk(tree)
                   if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                   and ast.unparse(node.right).split(".")[-1] in names
                   and module != "headshot_kit.records")
    assert joins == []


# The modules that name a config.json, each for a record of its own (or a model's hub file);
# the LoRA's record is not among them: headshot_kit.lora writes and reads it.
CONFIG_JSON = {
    "headshot_kit.lora": "the LoRA's record",
    "headshot_kit.prepare": "the dataset's record, written",
    "headshot_kit.train.data": "the dataset's record, read for the subject words",
    "headshot_kit.generate": "the pack's record",
    "headshot_kit.evaluate": "the scores' record, and the pack's (which LoRA rendered it)",
    "headshot_kit.evaluate.clip": "the CLIP model's hub config.json",
}


def test_the_lora_record_is_written_and_read_in_lora_only():
    assert _naming("config.json") <= set(CONFIG_JSON)
    # Nobody else builds the path of a LoRA folder's record ...
    joins = sorted(f"{module}: {ast.unparse(node)}" for module, tree in _modules().items()
                   if module != "headshot_kit.lora" for node in ast.walk(tree)
                   if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                   and "lora" in ast.unparse(node.left).lower()
                   and ast.unparse(node.right) in ("'config.json'", "LORA_RECORD"))
    assert joins == []
    # ... nor writes a TrainConfig's record (save_config) anywhere but in lora.
    writers = sorted(module for module, tree in _modules().items() for node in ast.walk(tree)
                     if isinstance(node, ast.Call) and ast.unparse(node.func) == "save_config"
                     and "trainer.cfg" in ast.unparse(node))
    assert writers == []


def test_a_stages_record_is_parsed_by_read_record_only():
    """storage.read_record reads every stage's config.json: {} when there is none, and a
    damaged one (cut short, not a record, not text) named in one line."""
    parsers = sorted(f"{module}: {ast.unparse(node)}" for module, tree in _modules().items()
                     for node in ast.walk(tree)
                     if isinstance(node, ast.Call)
                     and ast.unparse(node.func) in ("json.loads", "json.load")
                     and ("config.json" in ast.unparse(node) or "LORA_RECORD" in ast.unparse(node)))
    assert parsers == []


def _literals(tree: ast.AST) -> list[tuple]:
    """Every tuple, list or set of constants written in the code."""
    return [tuple(e.value for e in n.elts) for n in ast.walk(tree)
            if isinstance(n, (ast.Tuple, ast.List, ast.Set)) and n.elts
            and all(isinstance(e, ast.Constant) for e in n.elts)]


def test_the_unet_targets_are_written_once():
    found = [module for module, tree in _modules().items() for value in _literals(tree)
             if {"to_q", "to_k", "to_v", "to_out.0"} <= set(value)]
    assert found == ["headshot_kit.config_checks"]


def test_the_photo_suffixes_are_written_once():
    found = [module for module, tree in _modules().items() for value in _literals(tree)
             if ".heic" in value and ".jpg" in value]
    assert found == ["headshot_kit.images"]


def test_the_multiple_of_8_rule_is_written_once():
    found = [module for module, tree in _modules().items() for node in ast.walk(tree)
             if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
             and isinstance(node.right, ast.Constant) and node.right.value == 8]
    assert found == ["headshot_kit.config_checks"]


def test_the_face_detectors_upsampling_retry_is_written_once():
    """The plain HOG pass before the upsampled one: faces.detect_faces_hog, which the
    stages (through find_faces) and the face benchmark call."""
    trees = {**_modules(), **{f"bench.{p.stem}": ast.parse(p.read_text(encoding="utf-8"))
                              for p in sorted((ROOT / "bench").glob("*.py"))}}
    found = [module for module, tree in trees.items() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("detect_faces")
             and any(k.arg == "upsample" and isinstance(k.value, ast.Constant)
                     and k.value.value == 0 for k in node.keywords)]
    assert found == ["headshot_kit.faces"]


# Round trips: what the writer writes, the reader reads back.

def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    return message


def test_the_lora_record_reads_back_as_written(tmp_path):
    from headshot_kit.config import TrainConfig
    from headshot_kit.lora import (BEST_DIR, LoraRecord, chosen_checkpoint, read_lora_record,
                                   ui_weights, write_lora_record)

    cfg = TrainConfig(family="sd15", model="some/model")
    (tmp_path / "me.safetensors").write_bytes(b"x")
    write_lora_record(tmp_path, cfg, token="zwx", class_name="young woman",
                      ui_weights="me.safetensors", checkpoint=BEST_DIR, step=4,
                      likeness=0.61, chosen_by="dlib-resnet")
    record = read_lora_record(tmp_path)
    assert record == LoraRecord(path=tmp_path / "config.json", family="sd15",
                                model="some/model", token="zwx", class_name="young woman",
                                ui_weights="me.safetensors", checkpoint=BEST_DIR, step=4,
                                likeness=0.61, chosen_by="dlib-resnet")
    # The whole TrainConfig is in the file too, for tracing the LoRA to its settings.
    assert json.loads(record.path.read_text())["rank"] == cfg.rank
    assert chosen_checkpoint(tmp_path) == {"step": 4, "likeness": 0.61,
                                           "chosen_by": "dlib-resnet"}
    assert ui_weights(tmp_path) == tmp_path / "me.safetensors"
    # The last weights' record carries no choice.
    write_lora_record(tmp_path, cfg, token="zwx", class_name="person", checkpoint="last", step=9)
    assert chosen_checkpoint(tmp_path) == {} and read_lora_record(tmp_path).step == 9


def test_a_lora_record_missing_or_half_written_is_named(tmp_path):
    from headshot_kit.config import DataError
    from headshot_kit.lora import LoraRecord, read_lora_record

    # A LoRA from elsewhere has no record: nothing is recorded, nothing refused.
    assert read_lora_record(tmp_path) == LoraRecord(path=tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"family": "sd15", "token": "zwx"}))
    with pytest.raises(DataError) as exc:
        read_lora_record(tmp_path)
    assert "class_name" in _one_line(exc, tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"family": "sd1')
    with pytest.raises(DataError) as exc:
        read_lora_record(tmp_path)
    assert "damaged" in _one_line(exc, tmp_path / "config.json")


def test_the_manifest_reads_back_as_written(tmp_path):
    from headshot_kit.generate import MANIFEST_COLUMNS, load_manifest
    from headshot_kit.records import read_manifest, write_manifest

    rows = [{c: "" for c in MANIFEST_COLUMNS} | {"file": f"images/a_seed{i}.png", "seed": i,
                                                 "steps": 30, "guidance": 7.5,
                                                 "starred": i == 1} for i in range(3)]
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    write_manifest(manifest, tmp_path)
    back = read_manifest(tmp_path)
    assert list(back.columns) == MANIFEST_COLUMNS
    # Empty text stays "" (not NaN), numbers stay numbers, stars stay booleans.
    assert back["negative_prompt"].tolist() == ["", "", ""]
    assert back["seed"].tolist() == [0, 1, 2] and back["guidance"].tolist() == [7.5] * 3
    assert back["starred"].tolist() == [False, True, False]
    pd.testing.assert_frame_equal(load_manifest(tmp_path), back)


def test_a_manifest_missing_a_column_is_named(tmp_path, obama_photos):
    from headshot_kit.config import DataError
    from headshot_kit.evaluate import evaluate_images
    from headshot_kit.generate import load_manifest

    pd.DataFrame({"file": ["images/a.png"], "style": ["studio"]}).to_csv(
        tmp_path / "manifest.csv", index=False)
    with pytest.raises(DataError) as exc:
        load_manifest(tmp_path)  # stars need their column
    assert "'starred'" in _one_line(exc, tmp_path / "manifest.csv")
    pd.DataFrame({"image": ["images/a.png"]}).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(DataError) as exc:
        evaluate_images(obama_photos, tmp_path, tmp_path / "scores")
    assert "'file'" in _one_line(exc, tmp_path / "manifest.csv")


def test_the_metrics_read_back_as_written(tmp_path):
    from headshot_kit.config import DataError
    from headshot_kit.records import METRICS_COLUMNS, read_metrics, write_metrics

    rows = [{"step": 1, "loss": 0.25, "lr": 1e-4, "skipped": False},
            {"step": 2, "loss": 0.125, "lr": 1e-4, "skipped": False, "likeness": 0.5,
             "copies": 0}]
    assert write_metrics(rows, tmp_path / "run") == tmp_path / "run" / "metrics.csv"
    back = read_metrics(tmp_path / "run")
    assert list(back.columns) == list(METRICS_COLUMNS)
    pd.testing.assert_frame_equal(back, pd.DataFrame(rows, columns=list(METRICS_COLUMNS)),
                                  check_dtype=False)
    assert np.isnan(back["likeness"].iloc[0]) and back["likeness"].iloc[1] == 0.5
    pd.DataFrame({"step": [1]}).to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(DataError) as exc:
        read_metrics(tmp_path)
    assert "'loss'" in _one_line(exc, tmp_path / "metrics.csv")


def test_the_experiments_table_has_one_place_and_reads_back(tmp_path, monkeypatch):
    from headshot_kit.config import DataError
    from headshot_kit.evaluate import EXPERIMENTS_TABLE
    from headshot_kit.records import experiments_table, read_experiments, write_experiments
    from headshot_kit.workspace import workspace

    # A work folder's, a sweep's out folder's and, outside both, results/'s: one rule.
    assert workspace(tmp_path / "work").experiments == tmp_path / "work" / "experiments.csv"
    assert experiments_table(tmp_path / "sweep") == tmp_path / "sweep" / "experiments.csv"
    assert EXPERIMENTS_TABLE == experiments_table() == Path("results") / "experiments.csv"

    table = experiments_table(tmp_path)
    assert read_experiments(table, missing_ok=True).empty
    with pytest.raises(FileNotFoundError) as exc:
        read_experiments(table)
    _one_line(exc, table)
    runs = pd.DataFrame({"run_id": ["r4", "r16"], "rank": [4, 16], "likeness": [0.5, 0.625]})
    write_experiments(runs, table)
    pd.testing.assert_frame_equal(read_experiments(table), runs)
    write_experiments(runs.drop(columns="run_id"), table)
    with pytest.raises(DataError) as exc:
        read_experiments(table)
    assert "'run_id'" in _one_line(exc, table)


def test_a_gif_in_the_photos_folder_counts_as_the_photo_prepare_reads(tmp_path):
    """One list of photo suffixes: the work folder counts what the prepare stage reads (an
    animated GIF gives its first frame), and a zip."""
    from PIL import Image

    from headshot_kit.workspace import list_photos

    Image.new("RGB", (8, 8)).save(tmp_path / "me.gif")
    (tmp_path / "more.zip").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_photos(tmp_path)] == ["me.gif", "more.zip"]
