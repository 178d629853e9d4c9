"""The README stays true: its two commands, and a configuration reference matching pyproject."""

from __future__ import annotations

import re
from pathlib import Path

from common.config import default_user_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    first_block = README.split("```")[1]
    assert "make run" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _documented_defaults() -> dict[str, str]:
    section = README.split("## Configuration reference")[1].split("\n## ")[0]
    return dict(re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]+?) \|", section, flags=re.M))


def _same(documented: str, value: object) -> bool:
    text = documented.strip().strip("`")
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, (int, float)):
        return float(text) == float(value)
    return text == (value or '""')


def test_configuration_reference_lists_every_key_with_its_default() -> None:
    documented, defaults = _documented_defaults(), default_user_config()
    assert set(documented) == set(defaults)
    wrong = {k: (documented[k], v) for k, v in defaults.items() if not _same(documented[k], v)}
    assert not wrong, wrong
