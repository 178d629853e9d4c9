"""Run and site configuration: defaults parse, bad keys and values are rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_config import NodeConfigError, SiteConfig
from common.config import ConfigError, RunConfig, default_user_config, run_config_with


def test_pyproject_defaults_parse_into_typed_sections() -> None:
    run = RunConfig.from_user_config(default_user_config())
    assert run.federation.num_server_rounds == 3
    assert run.model.preset == "demo" and run.model.fusion == "concat"
    assert run.model.class_names == ("normal", "pneumonia", "effusion")
    assert run.privacy.dp is True and run.privacy.target_epsilon == 8.0
    assert isinstance(run.train.learning_rate, float)


def test_unknown_key_is_rejected_with_a_suggestion() -> None:
    cfg = {**default_user_config(), "num-server-round": 5}
    with pytest.raises(ConfigError, match=r"'num-server-round' \(did you mean 'num-server-rounds'\?\)"):
        RunConfig.from_user_config(cfg)


def test_missing_key_is_named() -> None:
    cfg = default_user_config()
    del cfg["batch-size"]
    with pytest.raises(ConfigError, match="batch-size"):
        RunConfig.from_user_config(cfg)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("batch-size", 0, r"'batch-size' is 0; it must be >= 1"),
    ("target-epsilon", 0.0, r"'target-epsilon' is 0.0; it must be > 0"),
    ("target-delta", 1.5, r"'target-delta' is 1.5; it must be <= 1"),
    ("fusion", "sum", r"'fusion' is 'sum'; allowed values: 'concat', 'weighted', 'attention'"),
    ("preset", "huge", r"allowed values: 'tiny', 'demo', 'seed'"),
    ("dp", "yes", r"'dp' must be of type bool"),
    ("seed", 1.5, r"'seed' must be of type int"),
    ("class-names", "normal", r"at least two distinct class names"),
    ("trainable-image-blocks", 5, r"it must be <= 4"),
])
def test_bad_values_name_the_key_and_what_is_allowed(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_config_with({key: value})


def test_int_is_accepted_for_a_float_key() -> None:
    assert run_config_with({"learning-rate": 1}).train.learning_rate == 1.0


def test_site_from_deployment_node_config(tmp_path: Path) -> None:
    data = run_config_with({}).data
    manifest = tmp_path / "st-mary" / "manifest.csv"
    site = SiteConfig.from_node_config({"manifest": str(manifest), "state-dir": "/var/ff"}, data)
    assert site == SiteConfig(site_name="st-mary", manifest=manifest, state_dir=Path("/var/ff"))
    (tmp_path / "folder-site").mkdir()
    named = SiteConfig.from_node_config({"manifest": str(tmp_path / "folder-site"), "state-dir": "s",
                                         "policy": "/etc/p.toml"}, data)
    assert named.site_name == "folder-site" and named.policy == Path("/etc/p.toml")
    with pytest.raises(NodeConfigError, match="no state-dir"):
        SiteConfig.from_node_config({"manifest": str(manifest)}, data)


def test_site_from_simulation_partition(tmp_path: Path) -> None:
    data = run_config_with({"data-root": str(tmp_path)}).data
    site = SiteConfig.from_node_config({"partition-id": 2, "num-partitions": 3}, data)
    assert site == SiteConfig(site_name="hospital-2", manifest=tmp_path / "hospital-2",
                              state_dir=tmp_path / "hospital-2" / "state", policy=None,
                              simulated=True)
    (tmp_path / "hospital-1").mkdir()
    (tmp_path / "hospital-1" / "policy.toml").write_text("max-epsilon = 3.0\n")
    data = run_config_with({"data-root": str(tmp_path), "state-root": "/elsewhere"}).data
    site = SiteConfig.from_node_config({"partition-id": 1}, data)
    assert site.policy == tmp_path / "hospital-1" / "policy.toml"
    assert site.state_dir == Path("/elsewhere/hospital-1/state")


def test_site_node_config_errors() -> None:
    data = run_config_with({}).data
    with pytest.raises(NodeConfigError, match="Unknown node config key"):
        SiteConfig.from_node_config({"manifest": "m.csv", "dataset-path": "x"}, data)
    with pytest.raises(NodeConfigError, match="no data"):
        SiteConfig.from_node_config({}, data)
