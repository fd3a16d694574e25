"""The package's layering, read from the source: each layer imports only layers below it, no command module is
imported by library code, the imports have no cycle, and no module grows past the size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gti"
COMMANDS = ("prepare", "sids", "ground", "finetune", "diagnose", "benchmark", "protocol", "sasrec", "__main__")
# low -> high; a layer may import itself and any layer listed before it
LAYERS = ["core", "data", "indexing", "tokens", "rank", "analysis", "train", "experiments", "testing", "commands"]
MAX_LINES = 360


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"  # gti/__init__.py: version and start time only
    if parts[1] in COMMANDS:
        return "commands"
    return parts[1]


def gti_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every gti module `path` imports, at the top or inside a function (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("gti"):
            found.add(node.module)
            for a in node.names:  # `from gti import ground`, `from gti.train import stage`: a module, not a name
                target = package.parent / f"{node.module}.{a.name}".replace(".", "/")
                if target.is_dir() or target.with_suffix(".py").is_file():
                    found.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            pytest.fail(f"{path}: relative import (line {node.lineno}); gti imports by absolute name")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gti"))
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, package): gti_imports(p, package) for p in package.rglob("*.py")}


def upward_imports(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for module, imports in graph(package).items():
        here = layer_of(module)
        for target in imports:
            there = layer_of(target)
            if there != "root" and (here == "root" or LAYERS.index(there) > LAYERS.index(here)):
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    return wrong


def test_every_module_belongs_to_a_known_layer():
    unknown = {m for m in graph() if layer_of(m) not in LAYERS + ["root"]}
    assert not unknown, f"modules outside the layers {LAYERS}: {sorted(unknown)}"


def test_layers_import_only_downwards():
    wrong = upward_imports()
    assert not wrong, "\n".join(wrong)


def test_no_library_module_imports_a_command():
    wrong = [f"{m} imports {t}" for m, imports in graph().items() if layer_of(m) != "commands"
             for t in imports if layer_of(t) == "commands"]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_imports_have_no_cycle():
    modules = graph()
    edges = {m: {t for t in imports if t in modules} for m, imports in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if t == m:
                continue
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_no_module_is_too_long_to_read():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check reads real imports: an upward one hidden in a function body of a lower layer is found."""
    package = tmp_path / "gti"
    (package / "core").mkdir(parents=True)
    (package / "train").mkdir()
    (package / "train" / "trainer.py").write_text("def make_trainer():\n    pass\n")
    (package / "core" / "probe.py").write_text("def f():\n    from gti.train.trainer import make_trainer\n")
    (package / "ground.py").write_text("")
    (package / "data").mkdir()
    (package / "data" / "probe.py").write_text("from gti import ground\n")
    assert sorted(upward_imports(package)) == ["gti.core.probe (core) imports gti.train.trainer (train)",
                                               "gti.data.probe (data) imports gti.ground (commands)"]  # fmt: skip
