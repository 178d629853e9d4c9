"""`fedfusion run`: its exit code and last line follow the run's status, not `flwr run`'s exit code.

A stand-in `flwr` (a script) plays the SuperLink's answers; the real one runs in
`tests/test_deployment.py` (a stopped run) and `tests/test_deploy_guide.py` (a completed run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tools import submit

FAKE_FLWR = """#!{python}
import json, os, sys
if sys.argv[1] == "run":
    print("Successfully started run 42")
    print("INFO server.recorder: round 1")
    sys.exit(int(os.environ.get("FAKE_RUN_EXIT", "0")))
assert sys.argv[1:] == ["list", "consortium", "--run-id", "42", "--format", "json"], sys.argv
print("Using SuperLink: consortium")
print(json.dumps({{"success": True, "runs": [json.loads(os.environ["FAKE_RUN"])]}}))
"""


@pytest.fixture
def fake_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "flwr"
    path.write_text(FAKE_FLWR.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setattr(submit, "flwr_executable", lambda: str(path))
    return path


def _run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], status: str, details: str
) -> tuple[int, list[str]]:
    monkeypatch.setenv("FAKE_RUN", json.dumps({"status": status, "status-details": details}))
    code = submit.main([".", "consortium", "--run-config", "num-server-rounds=1"])
    return code, capsys.readouterr().out.splitlines()


def test_a_completed_run_exits_0_and_says_so(
    fake_flwr: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = _run(monkeypatch, capsys, "finished:completed", "")
    assert code == 0
    assert lines == [
        "Successfully started run 42",
        "INFO server.recorder: round 1",  # the stream, passed through
        "run 42: finished:completed",
    ]


def test_a_failed_run_exits_1_with_the_reason_on_the_last_line(
    fake_flwr: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    why = "ServerApp failed with exception: The run stopped early: Round 1: 0 site(s) sent ..."
    code, lines = _run(monkeypatch, capsys, "finished:failed", why)
    assert code == 1 and lines[-1] == f"run 42: finished:failed: {why}"


def test_flwr_runs_own_failure_is_passed_on(
    fake_flwr: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_RUN_EXIT", "3")
    code, lines = _run(monkeypatch, capsys, "running", "")
    assert code == 3 and "`flwr run` failed (exit code 3)" in lines[-1]
