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

from client.site_config import SiteConfig
from tests.conftest import tiny_run
from tests.local_federation import executable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
GUIDE = (DEPLOY / "README.md").read_text()
# the official image each service runs (or builds on), and the executable that image starts
ENTRYPOINTS = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
               "flwr/superexec": "flower-superexec"}
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]+)")


@functools.cache
def _help(executable_name: str) -> str:
    return subprocess.run([executable(executable_name), "--help"], capture_output=True, text=True,
                          timeout=60, check=True).stdout


def _image(service: dict) -> str:
    return service["build"]["args"]["BASE"] if "build" in service else service["image"]


def test_compose_services_use_the_official_images_of_the_installed_flower() -> None:
    images = {name: _image(s) for name, s in COMPOSE["services"].items()}
    assert set(images) == {"superlink", "serverapp", "supernode-a", "supernode-b"}
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
        tls_and_auth = {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth"}
        assert tls_and_auth <= set(flags)
    else:
        assert "--root-certificates" in flags


@pytest.mark.parametrize("name", ["supernode-a", "supernode-b"])
def test_compose_node_config_is_a_valid_site_config(name: str) -> None:
    command = COMPOSE["services"][name]["command"]
    node_config = next(a.split("=", 1)[1] for a in command if a.startswith("--node-config="))
    site = SiteConfig.from_node_config(parse_config_args([node_config]), tiny_run())
    assert site.site_name == name.replace("supernode", "hospital")
    mounts = [v.split(":")[1] for v in COMPOSE["services"][name]["volumes"]]
    assert str(site.manifest.parent) in mounts and str(site.state_dir) in mounts


def _guide_commands() -> list[tuple[str, list[str]]]:
    """(executable, flags) of every flower-* command in the guide's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE, flags=re.S)
    commands = " ".join(blocks).replace("\\\n", " ").splitlines()
    found = []
    for line in commands:
        for part in line.split("&&"):
            words = part.split()
            if words and words[0] in ("flower-superlink", "flower-supernode"):
                found.append((words[0], _FLAG.findall(part.split('"')[0])))
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
