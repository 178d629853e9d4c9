"""deploy/: the Compose file parses and uses flags the installed Flower has; the guide stays secure.

CI does not run Docker; these checks keep `docker-compose.yml` and `deploy/README.md` true to
flwr's installed version and to FedFusion's node config.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import flwr
import pytest
import yaml
from flwr.common.config import parse_config_args

from client.node import build_parser
from client.site_config import SiteConfig
from simulations.loopback import executable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
GUIDE = (DEPLOY / "README.md").read_text()
# the official image each service runs (or builds on), and the executable that image starts
ENTRYPOINTS = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "flwr/superexec": "flower-superexec",
}
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]+)")


@functools.cache
def _help(executable_name: str) -> str:
    return subprocess.run(
        [executable(executable_name), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def _image(service: dict) -> str:
    return service["build"]["args"]["BASE"] if "build" in service else service["image"]


def test_compose_services_use_the_official_images_of_the_installed_flower() -> None:
    images = {name: _image(s) for name, s in COMPOSE["services"].items()}
    assert set(images) == {
        "superlink",
        "serverapp",
        "supernode-a",
        "supernode-b",
        "node-a",
        "node-b",
    }
    for name, image in images.items():
        repo, tag = image.split(":")
        assert repo in ENTRYPOINTS and tag == flwr.__version__, (name, image)
    for service in COMPOSE["services"].values():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("name", ["superlink", "serverapp", "supernode-a", "supernode-b"])
def test_compose_commands_use_existing_flags_and_tls(name: str) -> None:
    service = COMPOSE["services"][name]
    help_text = _help(ENTRYPOINTS[_image(service).split(":")[0]])
    flags = [arg.split("=")[0] for arg in service["command"]]
    assert all(f in help_text for f in flags), (flags, name)
    assert "--insecure" not in flags
    if name == "superlink":
        tls_and_auth = {
            "--ssl-certfile",
            "--ssl-keyfile",
            "--ssl-ca-certfile",
            "--enable-supernode-auth",
        }
        assert tls_and_auth <= set(flags)
    else:
        assert "--root-certificates" in flags


@pytest.mark.parametrize("hospital", ["a", "b"])
def test_each_hospital_runs_a_supernode_in_process_isolation_and_its_node(hospital: str) -> None:
    supernode, node = (COMPOSE["services"][f"{kind}-{hospital}"] for kind in ("supernode", "node"))
    flags = dict(a.split("=", 1) for a in supernode["command"])
    assert flags["--isolation"] == "process" and "--node-config" not in flags
    assert node["entrypoint"] == ["fedfusion", "node"]
    options = dict(a.split("=", 1) for a in node["command"])
    assert set(options) <= {
        a.dest.replace("_", "-").join(["--", ""])
        for a in build_parser()._actions
        if a.option_strings
    }
    assert options["--supernode"] == f"supernode-{hospital}:{flags['--port']}"
    assert options["--superexec-auth-secret-file"] == flags["--superexec-auth-secret-file"]
    site = SiteConfig.deployed(parse_config_args([options["--node-config"]]))
    assert site.site_name == f"hospital-{hospital}"
    mounts = [v.split(":")[1] for v in node["volumes"]]
    assert str(site.manifest.parent) in mounts and str(site.state_dir) in mounts
    assert not [v for v in supernode["volumes"] if "/app/data" in v]  # the data: the node's only


def _unquoted(command: str) -> str:
    """A command line without its quoted arguments (a node config holds no flags)."""
    return re.sub(r'"[^"]*"', "", command)


def _guide_commands() -> list[tuple[str, list[str]]]:
    """(executable, flags) of every flower-* command in the guide's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE, flags=re.S)
    commands = " ".join(blocks).replace("\\\n", " ").splitlines()
    found = []
    for line in commands:
        for part in line.split("&&"):
            words = part.split()
            if words and words[0] in ("flower-superlink", "flower-supernode"):
                found.append((words[0], _FLAG.findall(_unquoted(part))))
    return found


def test_guide_commands_use_flags_the_installed_flower_has_and_never_insecure() -> None:
    commands = _guide_commands()
    assert {c for c, _ in commands} == {"flower-superlink", "flower-supernode"}
    for command, flags in commands:
        missing = [f for f in flags if f not in _help(command)]
        assert not missing, (command, missing)
        assert "--insecure" not in flags
    assert "--enable-supernode-auth" in dict(commands)["flower-superlink"]
    assert "--auth-supernode-private-key" in dict(commands)["flower-supernode"]


def test_main_readme_links_the_deployment_guide() -> None:
    assert "(deploy/README.md)" in (ROOT / "README.md").read_text()


def test_guide_and_readme_node_commands_use_the_nodes_options() -> None:
    options = {s for a in build_parser()._actions for s in a.option_strings}
    for text in (GUIDE, (ROOT / "README.md").read_text()):
        blocks = " ".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
        lines = [ln for ln in blocks.splitlines() if ln.strip().startswith("fedfusion node")]
        assert lines, "the guide shows how a hospital starts its node"
        for line in lines:
            flags = _FLAG.findall(_unquoted(line))
            assert set(flags) <= options and "--node-config" in flags, line
