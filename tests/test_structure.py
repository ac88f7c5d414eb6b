"""The package's shape: its import graph has no circle and runs one way through the layers the
README's layout names, and the fit check stands beside the stages it checks, not above them.

The graph is read from the source with `ast` (every import, also those inside functions, where
the package imports what is heavy or late; imports under `if TYPE_CHECKING:` are annotations
only and never run). A package's `__init__` is a module of its own: `from .x import y` inside
a package points at `x`, and `from . import name` at `name` where it is a module, else at the
`__init__`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "headshot_kit"

# The layers, from the README's layout. A top-level module or subpackage of headshot_kit is in
# one of them; each may import from its own layer (without a circle) and from those below it.
APP = {"__main__", "cli", "demo", "sweep", "multigpu", "widgets"}  # drive the stages
STAGES = {"prepare", "train", "generate", "evaluate"}  # one per stage
BESIDE = {"fitcheck"}  # predicts the stages' cost, from the shared pieces alone
# Everything else is a shared piece the stages stand on (config, families, models, lora, ...).
# Between stages: training chooses its checkpoint by likeness, scored by the evaluate stage's
# face embedder (one definition of likeness); no other stage imports another.
STAGE_USES = {"train": {"evaluate"}}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in mods else source)
        graph[name] = {t for t in map(resolve, (t for t in targets
                                                if t.split(".")[0] == PACKAGE))
                       if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unit(module: str) -> str:
    """The top-level module or subpackage a module belongs to ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(name: str) -> int:
    return 3 if name in APP else 2 if name in STAGES else 1 if name in BESIDE else 0


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph()) == []


def test_imports_run_down_the_layers():
    wrong = []
    for source, targets in import_graph().items():
        a = unit(source)
        for target in targets:
            b = unit(target)
            if a == b or b == "":  # within a unit; the package's version
                continue
            if a in APP:
                continue
            if a in STAGES and b in STAGES:
                if b not in STAGE_USES.get(a, set()):
                    wrong.append(f"{source} -> {target}")
            elif layer(b) > layer(a):
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_the_fit_check_imports_no_stage():
    stages = {m: t for m, t in import_graph().items() if unit(m) == "fitcheck"}
    assert stages, "no fitcheck modules found"
    reached = sorted(f"{m} -> {t}" for m, ts in stages.items() for t in ts
                     if unit(t) in {"train", "generate", "evaluate"})
    assert reached == []


def test_the_graph_reader_sees_the_imports_it_must():
    """The reader itself: a relative import, one inside a function, and `from . import name`
    of a module are all edges; an annotation-only import is not."""
    graph = import_graph()
    assert "headshot_kit.config" in graph["headshot_kit.storage"]  # from .config import ...
    assert "headshot_kit.families.sd15" in graph["headshot_kit.families"]  # from . import sd15
    assert "headshot_kit.sweep" not in graph["headshot_kit.multigpu"]
    # sweep imports multigpu inside a function only.
    assert "headshot_kit.multigpu" in graph["headshot_kit.sweep"]
    assert "headshot_kit.train" not in graph["headshot_kit.train.card"]  # TYPE_CHECKING only


def test_the_trainer_class_is_read_in_one_sitting():
    """The Trainer holds the loop; setting up, checkpoints, validation and what a finished run
    writes are modules of their own (train.setup, checkpoints, validation, outputs)."""
    tree = ast.parse((ROOT / PACKAGE / "train" / "__init__.py").read_text(encoding="utf-8"))
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno < 300


def test_no_module_is_over_600_lines():
    """Past about 600 lines a module is split along the seams its own sections draw."""
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}
