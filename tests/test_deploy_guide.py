"""deploy/README.md as a script: its command blocks are `deploy/guide.sh`'s steps, and they run.

The guide's Steps 1 to 5 hold every command a coordinator or a hospital runs; `deploy/guide.sh`
holds the same blocks, one function each, and runs them on loopback (TLS, SuperNode
authentication, two hospitals, one tiny round). So a guide that no longer works fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.runfolder import RunFolder
from simulations.loopback import free_port

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "deploy" / "README.md").read_text()
SCRIPT = (ROOT / "deploy" / "guide.sh").read_text()
GUIDE_TIMEOUT = 600  # seconds for the whole guide (about 2 min on 2 idle cores)


def guide_blocks() -> list[str]:
    """The bash blocks of the guide's walkthrough (its values, then Steps 1 to 5), in order."""
    start = GUIDE.index("## The values used below")
    end = GUIDE.index("### When the SuperLink restarts mid-run")
    return re.findall(r"```bash\n(.*?)\n```", GUIDE[start:end], flags=re.S)


def _settings(block: str) -> bool:
    return all(line.startswith("export ") for line in block.splitlines())


def script_steps() -> dict[str, str]:
    """guide.sh's step functions: name -> body."""
    return dict(re.findall(r"^(step_\w+)\(\) \{\n(.*?)\n\}$", SCRIPT, flags=re.M | re.S))


def test_the_guides_command_blocks_are_the_scripts_steps_in_order() -> None:
    commands = [b for b in guide_blocks() if not _settings(b)]
    steps = script_steps()
    assert len(commands) >= 9 and list(steps.values()) == commands, (list(steps), commands)
    called = re.findall(r"\b(step_\w+)", SCRIPT.split("# --- what the guide leaves")[1])
    assert called == list(steps)  # each step is run, in the guide's order


def test_the_script_sets_every_value_the_guide_asks_for() -> None:
    asked = {
        line.split("=")[0].removeprefix("export ")
        for block in guide_blocks()
        if _settings(block)
        for line in block.splitlines()
    }
    assert asked >= {"FEDFUSION_DIR", "SITE_DIR", "SITE_NODES", "RUN_CONFIG"}
    set_here = set(re.findall(r"export (\w+)=", SCRIPT.split("# --- what the guide leaves")[1]))
    assert asked == set_here


def test_no_guide_block_outside_the_walkthrough_is_forgotten() -> None:
    """Every bash block of the guide is a step, Step 0's install, or the Docker trial's."""
    blocks = re.findall(r"```bash\n(.*?)\n```", GUIDE, flags=re.S)
    others = [b for b in blocks if b not in guide_blocks()]
    assert [b.split()[0] for b in others] == ["git", "#", "flwr"], others


@pytest.mark.slow
@pytest.mark.xdist_group("deploy-guide")
def test_the_guide_runs_end_to_end_on_loopback(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GUIDE_ROOT": str(tmp_path),
        "GUIDE_SUPERLINK_PORT": str(free_port()),
        "GUIDE_SUPERNODE_PORTS": f"{free_port()} {free_port()}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "deploy" / "guide.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=GUIDE_TIMEOUT,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    folder = RunFolder(tmp_path / "coordinator" / "outputs" / "guide")
    assert folder.read_summary().status == "completed" and len(folder.read_history()) == 1
    # the coordinator's view in `fedfusion run`'s stream: the round's table, the end, the status
    assert re.search(r"round 1\nsite +loss +accuracy +auroc +epsilon +cap +train n", out), out
    assert f"run completed; run folder {folder.path}: All 1 rounds completed." in out
    assert re.search(r"run \d+: finished:completed\n", out), out
    # each hospital's view: its node's log says the round's spend; its privacy report lists it
    for name in ("hospital-a", "hospital-b"):
        node_log = (tmp_path / "logs" / f"{name}-node.log").read_text()
        assert re.search(rf"{name}: run \S+ \(Flower run \d+\) round 1: .*this round", node_log)
    run_key = folder.read_settings().run_key[:16]  # as the privacy report shortens it
    assert len(re.findall(rf"(?m)^{run_key}\w* +1 +train ", out)) == 2, out  # both reports
    assert "guide.sh: every step ran in" in out
