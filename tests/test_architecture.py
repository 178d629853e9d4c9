"""The import rules of docs/ARCHITECTURE.md, checked on every module's imports (nested ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "simulations", "tools", "benchmarks")

# package -> top-level modules it must never import
FORBIDDEN = {
    "common": {"flwr", "flwr_datasets", "datasets", "client", "server", "simulations", "tools",
               "benchmarks", "tests"},
    "client": {"server", "simulations", "tools", "benchmarks", "tests", "flwr_datasets"},
    "server": {"client", "simulations", "benchmarks", "tests", "flwr_datasets"},
    "tools": {"benchmarks", "tests", "flwr_datasets", "flwr"},
    "simulations": {"benchmarks", "tests"},
    "benchmarks": {"tests"},
}
# the Flower edge: the only modules of client/ and server/ that may import flwr
FLOWER_EDGE = {"client/app.py", "client/node.py", "client/flower_runtime.py", "server/app.py", "server/loop.py", "server/recorder.py",
               "server/replies.py", "server/sites.py", "server/strategy.py"}
# the coordinator draws the operator's views after every round: its one use of tools/
SERVER_MAY_USE = {"tools.views"}


def imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_what_its_layer_may(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    package = rel.split("/")[0]
    used = imports(path)
    bad = sorted(m for m in used if m.split(".")[0] in FORBIDDEN[package])
    assert not bad, f"{rel} imports {bad}, which its layer ({package}/) must not use"
    if package in ("client", "server") and rel not in FLOWER_EDGE:
        assert not [m for m in used if m.split(".")[0] == "flwr"], \
            f"{rel} imports flwr: Flower stays at the edge ({sorted(FLOWER_EDGE)})"
    if package == "server":
        tools = sorted(m for m in used if m.split(".")[0] == "tools")
        assert set(tools) <= SERVER_MAY_USE, f"{rel} imports {tools}"


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The checker itself finds an import inside a function."""
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from flwr.app import Message\n    import server.loop\n")
    assert imports(sample) == {"flwr.app", "server.loop"}
