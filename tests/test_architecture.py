"""The import rules of docs/ARCHITECTURE.md, checked on every module's imports (nested ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "simulations", "tools", "benchmarks")

# package -> top-level modules it must never import
FORBIDDEN = {
    "common": {
        "flwr",
        "flwr_datasets",
        "datasets",
        "client",
        "server",
        "simulations",
        "tools",
        "benchmarks",
        "tests",
    },
    "client": {"server", "simulations", "tools", "benchmarks", "tests", "flwr_datasets"},
    "server": {"client", "simulations", "tools", "benchmarks", "tests", "flwr_datasets"},
    "tools": {"benchmarks", "tests", "flwr_datasets", "flwr"},
    # the `fedfusion` command (tools) dispatches to simulations, never the other way round
    "simulations": {"tools", "benchmarks", "tests"},
    "benchmarks": {"tests"},
}
# the Flower edge: the only modules of client/ and server/ that may import flwr
FLOWER_EDGE = {
    "client/app.py",
    "client/node.py",
    "client/flower_runtime.py",
    "server/app.py",
    "server/loop.py",
    "server/recorder.py",
    "server/replies.py",
    "server/secure.py",
    "server/sites.py",
    "server/strategy.py",
}


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


def violations(rel: str, used: set[str]) -> list[str]:
    """What is wrong with the imports `used` of the module at `rel` (a path under the root)."""
    package = rel.split("/")[0]
    found = [
        f"{rel} imports {m}, which its layer ({package}/) must not use"
        for m in sorted(used)
        if m.split(".")[0] in FORBIDDEN[package]
    ]
    if package in ("client", "server") and rel not in FLOWER_EDGE:
        found += [
            f"{rel} imports {m}: Flower stays at the edge ({sorted(FLOWER_EDGE)})"
            for m in sorted(used)
            if m.split(".")[0] == "flwr"
        ]
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_what_its_layer_may(path: Path) -> None:
    problems = violations(path.relative_to(ROOT).as_posix(), imports(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("rel", "module"),
    [
        ("server/recorder.py", "tools.views"),  # the coordinator on an operator tool
        ("server/loop.py", "tools"),
        ("client/rounds.py", "tools.report"),
        ("simulations/cli.py", "tools.cli"),  # the command dispatches to simulations, not back
        ("common/runfolder.py", "server.recorder"),
        ("server/evaluation.py", "flwr.app"),  # off the Flower edge
    ],
)
def test_an_upward_import_is_a_violation(rel: str, module: str) -> None:
    assert violations(rel, {"common.config", module}) != []
    assert violations(rel, {"common.config"}) == []


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The checker itself finds an import inside a function."""
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from flwr.app import Message\n    import server.loop\n")
    assert imports(sample) == {"flwr.app", "server.loop"}
