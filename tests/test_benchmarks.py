"""The benchmark runner's outputs (schema), on its cheapest benchmark; helpers with known values."""

from __future__ import annotations

import ast
import csv
import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.config import validate_fields_in_config

import client.secure
from benchmarks import (
    deployment,
    dp_recipe,
    secagg_overhead,
    secagg_utility,
    side_channels,
    small_hospitals,
    utility,
)
from benchmarks.cli import SUMMARY_KEYS, main
from benchmarks.federation import Hospitals
from benchmarks.record import meets
from benchmarks.simulation import SimulationTiming
from benchmarks.traffic import payload_bytes
from benchmarks.workloads import bench_user_config
from common.model.checkpoint import MODEL_WEIGHTS, load_tensors
from common.privacy.accounting import calibrate_noise
from common.privacy.ledger import load_ledger
from common.runfolder import RunFolder
from common.secagg.site import SiteSession


def test_aggregation_benchmark_writes_its_json_and_the_summary(tmp_path: Path, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "--only",
                    "aggregation",
                    "--quick",
                    "--out",
                    str(tmp_path),
                    "--work-dir",
                    str(tmp_path / "work"),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)  # the runner sets one thread for the whole process
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["aggregation_vs_numpy_ratio"] > 0
    assert all(summary[k] is None for k in SUMMARY_KEYS if k != "aggregation_vs_numpy_ratio")
    doc = json.loads((tmp_path / "aggregation.json").read_text())
    assert {
        "benchmark",
        "key",
        "value",
        "target",
        "met",
        "note",
        "settings",
        "raw",
        "machine",
        "versions",
        "seconds",
        "quick",
    } <= set(doc)
    assert doc["versions"]["flwr"] and doc["machine"]["cores"] >= 1
    for k, row in doc["raw"]["per_K"].items():
        assert row["max_abs_difference"] < 1e-5, k  # the server's FedAvg equals np.average
    assert "aggregation_vs_numpy_ratio" in capsys.readouterr().out


def test_busy_time_is_the_union_of_client_calls() -> None:
    timing = SimulationTiming(
        wall_s=10.0, intervals=[(1.0, 3.0), (2.0, 4.0), (6.0, 7.0)], peak_rss_bytes=0
    )
    assert timing.busy_s == 4.0  # [1, 4] and [6, 7]
    assert timing.client_compute_s == 5.0
    assert timing.first_client_s == 1.0


def test_payload_counts_serialised_bytes_and_halves_in_float16() -> None:
    state = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    fp32, fp16 = (
        payload_bytes(state, np.dtype("float32")),
        payload_bytes(state, np.dtype("float16")),
    )
    assert 4040 < fp32 < 4040 + 2 * 256  # the values plus one .npy header per array
    assert fp32 - fp16 == 2020


def test_targets_compare_in_their_direction() -> None:
    assert meets(1.2, "<= 1.2") and not meets(1.3, "<= 1.2")
    assert meets(50, ">= 50") and not meets(49.9, ">= 50")


# the smoke tests' recipe: a few steps, the fast accountant (they check the plumbing, not utility)
SMOKE = {"local-steps": 2, "accountant": "rdp"}
# and for settings at epsilon 1, no evaluation: a site plans a tenth of its budget for the
# evaluation releases, and RDP (orders up to 63) cannot certify the 0.1 that leaves (PRV can)
SMOKE_EPSILON_1 = {**SMOKE, "fraction-evaluate": 0.0}


def test_deployment_benchmark_runs_one_config_both_ways_and_times_rounds_2_to_n(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark's own logic, without its two runs: each is a product path tested end to end
    elsewhere (a loopback `flwr run`: tests/test_deployment.py; the simulation:
    tests/test_simulation.py), and together they took two minutes of this suite."""
    given: dict[str, object] = {}

    def deployed(work: Path, folders: list[Path], run_config: str, rounds: int) -> list[float]:
        given["deployed"] = (sorted(f.name for f in folders), run_config, rounds)
        return [1.0]

    def simulated(work: Path, root: Path, rounds: int, overrides: dict[str, object]) -> list[float]:
        given["simulated"] = (sorted(p.name for p in root.iterdir()), overrides, rounds)
        return [2.0]

    monkeypatch.setattr(deployment, "_deployed", deployed)
    monkeypatch.setattr(deployment, "_simulated", simulated)
    assert deployment.measure(tmp_path, preset="tiny", rounds=3, scale=0.1, overrides=SMOKE) == (
        [1.0],
        [2.0],
    )
    hospitals = [f"hospital-{i}" for i in range(deployment.HOSPITALS)]
    config = {"preset": "tiny", **SMOKE}
    # the same hospitals and the same run config, as `flwr run --run-config` and as a dict
    assert given["simulated"] == (hospitals, config, 3)
    names, run_config, rounds = given["deployed"]  # type: ignore[misc]
    assert names == hospitals and rounds == 3
    assert run_config.split() == [
        "preset='tiny'",
        "local-steps=2",
        "accountant='rdp'",
        "num-server-rounds=3",
        f"min-nodes={deployment.HOSPITALS}",
    ]

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    for r, mtime in ((1, 100.0), (2, 103.5), (3, 110.0)):  # round 1 fills the caches: left out
        folder.round_checkpoint(r).write_bytes(b"")
        os.utime(folder.round_checkpoint(r), (mtime, mtime))
    assert deployment.round_seconds(folder, 3) == [3.5, 6.5]


def test_the_flower_floor_is_a_plain_flower_app_without_fedfusion_code(tmp_path: Path) -> None:
    bundle = deployment.floor_bundle(tmp_path / "app")
    config = tomllib.loads((bundle / "pyproject.toml").read_text())
    valid, errors, _ = validate_fields_in_config(config)
    assert valid, errors
    tree = ast.parse((bundle / "floor_app.py").read_text())
    used = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    used |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    plain = {"__future__", "json", "time", "pathlib", "numpy", "flwr"}  # no FedFusion package
    assert {m.split(".")[0] for m in used} == plain


@pytest.mark.slow  # a real loopback federation of plain SuperNodes
def test_the_flower_floor_times_a_plain_app_round(tmp_path: Path) -> None:
    rounds = deployment.flower_floor(tmp_path, rounds=2, messages=1)
    assert len(rounds) == 1 and rounds[0] > 0


def test_sampling_asks_at_most_a_hundred_sites_a_round() -> None:
    from benchmarks.scale import sampling

    assert sampling(10) == (1.0, 10, 5)
    assert sampling(1000) == (0.1, 100, 50)


@pytest.mark.slow  # a Ray simulation of 4 tiny hospitals
def test_scale_benchmark_reports_time_per_round_and_both_memory_peaks(tmp_path: Path) -> None:
    from benchmarks.scale import measure

    (row,) = measure(tmp_path, sizes=(4,), rounds=1)
    assert row["completed"] and row["sampled_per_round"] == 4 and row["client_calls"] == 8
    assert 0 < row["peak_largest_process_rss_mib"] < row["peak_rss_mib"]
    assert 0 < row["per_round_s"] < row["wall_s"]


def test_membership_benchmark_audits_both_settings(tmp_path: Path) -> None:
    from benchmarks import membership
    from benchmarks.workloads import demo_hospitals

    folder = demo_hospitals(tmp_path / "demo", 3, size_scale=0.15)[2]
    results = membership.measure(
        tmp_path, folder, preset="tiny", rounds=1, local_epochs=2, references=2, accountant="rdp"
    )
    assert set(results) == {"nodp", "dp8"}
    for r in results.values():
        assert 0.0 <= r["auc_loss"] <= 1.0 and 0.0 <= r["auc_lira"] <= 1.0
        assert r["auc"] == max(r["auc_loss"], r["auc_lira"]) and r["members"] > r["non_members"]
        assert 0.0 <= r["tpr_at_1pct_fpr"] <= 1.0


def test_medpix_hospital_is_one_image_per_patient_or_absent(tmp_path: Path) -> None:
    from benchmarks.membership import medpix_site

    assert medpix_site(tmp_path / "none", source=tmp_path / "missing") is None
    source = tmp_path / "medpix"
    (source / "images").mkdir(parents=True)
    (source / "manifest.csv").write_text(
        'image,text,label,patient_id,site\nimages/a.png,"two\nlines",other,p1,thorax\n'
        "images/b.png,x,neoplasm,p2,head\nimages/c.png,y,neoplasm,p2,head\n"
    )
    text = (medpix_site(tmp_path / "site", source=source) / "manifest.csv").read_text()
    assert "../medpix/images/a.png" in text and "two\nlines" in text
    assert "b.png" in text and "c.png" not in text  # the case's first image only
    thorax = (
        medpix_site(tmp_path / "t", source=source, region="thorax", one_per_patient=False)
        / "manifest.csv"
    ).read_text()
    assert "a.png" in thorax and "b.png" not in thorax


def test_a_benchmark_setting_is_a_run_of_the_server_app_on_warm_sites(
    tmp_path: Path, demo_root: Path
) -> None:
    """Screening, the weight cap, each round's evaluation, the record and the sites' budgets."""
    rows = [r for r in utility.pooled_rows(sorted(demo_root.glob("hospital-*"))) if r.image]
    folders = [
        utility.write_manifest(tmp_path / "sites" / name, part).parent
        for name, part in (("small", rows[:10]), ("mid", rows[10:22]), ("big", rows[22:82]))
    ]
    hospitals = Hospitals(tmp_path / "federation")
    config = bench_user_config("tiny", **SMOKE, num_server_rounds=2, dp=True, target_epsilon=8.0)
    states = {f.name: hospitals.warm(f, config)[1] for f in folders}
    state = hospitals.federate(config, folders, "a")
    folder = RunFolder(tmp_path / "federation" / "runs" / "a")
    history = folder.read_history()
    assert [line.round for line in history] == [
        1,
        2,
    ] and folder.read_summary().status == "completed"
    assert not (folder.path / MODEL_WEIGHTS).exists()  # 1 MB here, 135 MB with the demo preset
    final = load_tensors(folder.round_checkpoint(2))
    assert set(final) == set(state) and all(torch.equal(final[k], state[k]) for k in state)
    for line in history:
        assert set(line.sites) == {"small", "mid", "big"} and line.rejected == {}
        # the round's lower median weight is mid's 12 rows: big's 60 count as 2 x 12
        assert line.capped == {
            "big": "weight 60 capped to 24 (max-weight-factor 2 x the round's median weight)"
        }
        # every site is asked to evaluate; these hold no validation rows (all are `split=train`)
        assert set(line.refusals) == {"small", "mid", "big"}
        assert all("too-few-records" in why for why in line.refusals.values())
    run_key = folder.read_settings().run_key
    for f in folders:
        entry = load_ledger(tmp_path / "federation" / "state" / f.name).run(run_key)
        assert entry is not None and entry.rounds == (1, 2) and entry.evaluated == ()
        # a tenth of the site's epsilon 8 is set aside for its 2 evaluation releases, as at a
        # deployed site (a researcher-played simulated hospital sets none aside)
        rows_at_site = {"small": 10, "mid": 12, "big": 60}[f.name]
        assert entry.account.release_noise_multiplier == pytest.approx(
            calibrate_noise(
                target_epsilon=0.8,
                target_delta=min(1e-5, 1 / (10 * rows_at_site)),
                sample_rate=1.0,
                total_steps=2,
                accountant="rdp",
            )
        )
    # the sites stayed warm: their frozen features were computed once, in the first run's round 1
    hospitals.federate(config, folders, "b")
    for f in folders:
        warm = hospitals.warm(f, config)[1]
        assert warm is states[f.name] and (warm.features.misses, warm.features.hits) == (1, 3)
    with pytest.raises(RuntimeError, match="setting c: Round 1: 0 site"):  # every site refuses
        hospitals.federate({**config, "class-names": "normal,effusion"}, folders, "c")


@pytest.mark.slow  # ten federations
def test_utility_benchmark_federates_every_setting_at_tiny_scale(tmp_path: Path) -> None:
    """A smoke run of the utility benchmark (tiny model, small hospitals, 2 rounds)."""
    out = utility.measure_settings(
        tmp_path, preset="tiny", scale=0.1, rounds=2, overrides=SMOKE_EPSILON_1
    )
    expected = {
        "central",
        "central-dp8",
        "federated",
        "federated-dp1",
        "federated-dp3",
        "federated-dp8",
        "local-mean",
    }
    assert expected <= set(out.raw)
    for name in expected:
        assert 0.0 <= out.raw[name]["auroc"] <= 1.0, name
    assert out.value == out.raw["central"]["auroc"] - out.raw["federated-dp8"]["auroc"]


@pytest.mark.slow  # 30 federations of the tiny model
def test_small_hospitals_benchmark_reports_every_setting_with_its_interval(tmp_path: Path) -> None:
    out = small_hospitals.run(
        True,
        tmp_path,
        preset="tiny",
        seeds=2,
        demo_scale=0.1,
        medpix=tmp_path / "absent.csv",
        overrides={**SMOKE_EPSILON_1, "num-server-rounds": 1},
    )
    assert out.key == "demo_small_auroc_fed_dp8" and "medpix-dev not found" in out.note
    settings = out.raw["demo_small"]["settings"]
    for name in (
        "central",
        "federated",
        "federated-dp1",
        "federated-dp3",
        "federated-dp8",
        "single-hospital",
        "single-hospital-dp8",
        "linear-probe",
    ):
        v = settings[name]
        assert len(v["values"]) == 2 and v["mean"] == pytest.approx(np.mean(v["values"]))
        assert v["ci95"][0] <= v["mean"] <= v["ci95"][1]
    assert out.value == settings["federated-dp8"]["mean"]
    assert set(out.extra) == {
        "demo_small_auroc_probe",
        "demo_small_gain_fed_dp8_vs_single_dp8",
        "demo_small_gap_central_vs_fed",
    }
    for split in out.raw["demo_small"]["splits"]:  # no test patient trains anywhere
        assert split["test_rows"] > 0 and len(split["hospital_rows"]) == 5


@pytest.mark.slow  # 6 federations of the tiny model
def test_trainable_sets_benchmark_compares_lora_with_fusion_and_head(tmp_path: Path) -> None:
    from benchmarks import trainable_sets

    out = trainable_sets.run(
        False,
        tmp_path,
        medpix=tmp_path / "absent.csv",
        preset="tiny",
        seeds=2,
        demo_scale=0.1,
        overrides={**SMOKE, "num-server-rounds": 1},
    )
    assert out.settings["data"] == "demo_small"
    assert set(out.raw) == set(trainable_sets.OPTIONS)
    for r in out.raw.values():
        assert len(r["values"]) == 2 and 0.0 <= r["mean"] <= 1.0 and r["federation_s"] > 0
    lora, plain = out.raw["lora-r8-top-layer"], out.raw["fusion+head"]
    assert out.value == lora["mean"] - plain["mean"]
    # tiny text layers are 64 wide: rank 8 on query and value of one layer adds 4 x 8 x 64 values
    assert lora["trainable_parameters"] - plain["trainable_parameters"] == 4 * 8 * 64


def test_small_hospitals_test_patients_are_held_out_of_every_site(tmp_path: Path) -> None:
    cases = [
        small_hospitals.Case(
            image="", text=f"report {i}", label="normal", patient=f"p{i // 2}", hospital=f"h{i % 3}"
        )
        for i in range(60)
    ]
    s = small_hospitals.split(cases, tmp_path, seed=1)

    def patients(folder: Path) -> set[str]:
        with (folder / "manifest.csv").open() as fh:
            return {r["patient_id"] for r in csv.DictReader(fh)}

    test = patients(s.test)
    assert len(test) == 6  # a fifth of the 30 patients
    for folder in (*s.hospitals, s.central):
        assert not patients(folder) & test
    assert set().union(*(patients(f) for f in s.hospitals)) == patients(s.central)


def test_confidence_interval_is_students_t_over_the_seeds() -> None:
    ci = small_hospitals.ci95([0.8, 0.9, 1.0])
    assert ci["mean"] == pytest.approx(0.9)
    assert ci["ci95"] == pytest.approx(
        [0.9 - 4.303 * 0.1 / 3**0.5, 0.9 + 4.303 * 0.1 / 3**0.5], abs=1e-3
    )


@pytest.mark.slow
def test_side_channels_benchmark_measures_each_attack_and_the_cost(tmp_path: Path) -> None:
    out = side_channels.run(
        True,
        tmp_path,
        trials=20,
        eval_trials=2000,
        medpix=tmp_path / "absent.csv",
        preset="tiny",
        demo_scale=0.2,
        shares=(0.1, 0.75),  # each share calibrates every site's noise: two are enough here
    )
    advantages = out.raw["advantages"]
    assert advantages["train-loss"] == 0.0  # the reply carries no training loss
    assert advantages["nan-canary"] == 0.0  # every update is finite, member or not
    # the Gaussian mechanism's bound at the default share: ~0.043 (one standard error 0.011)
    assert advantages["evaluation-query"] <= advantages["evaluation-run"] + 0.03
    assert -0.03 <= advantages["evaluation-run"] <= 0.09
    assert out.value == max(
        advantages["train-loss"], advantages["nan-canary"], advantages["evaluation-run"]
    )
    shares = out.raw["cost"]["shares"]
    assert set(shares) == {"0.1", "0.75"}
    # more of the budget for evaluation: less noise on each count
    noise = [shares[s]["noise_multiplier"] for s in ("0.1", "0.75")]
    assert noise == sorted(noise, reverse=True)
    assert set(out.extra) == {"eval_attack_advantage", "dp_eval_auroc_mae"}


@pytest.mark.slow  # 5 federations of the tiny model
def test_dp_recipe_benchmark_reports_both_tables_with_the_rules_rates(tmp_path: Path) -> None:
    out = dp_recipe.run(
        True,
        tmp_path,
        preset="tiny",
        seeds=1,
        medpix=tmp_path / "absent.csv",
        sizes=(20,),
        steps=(5, 20),
        batches=(32,),
    )
    natural = out.raw["demo_small"]["natural"]
    assert set(natural) == {"k5-b32", "k20-b32", "rule"}
    assert all(0.0 <= v["mean"] <= 1.0 for v in natural.values())
    assert out.value == pytest.approx(
        max(v["mean"] for v in natural.values()) - natural["k20-b32"]["mean"]
    )
    assert out.extra["dp_recipe_rule_gain_demo_small"][0] == pytest.approx(
        natural["rule"]["mean"] - natural["k20-b32"]["mean"]
    )
    size = out.raw["demo_small"]["sizes"]["20"]
    # two sites of 20 training rows at most: batch 32 already takes them all, as does the rule
    assert size["rule_rates"] == [1.0]
    assert 0.0 <= size["fixed"]["mean"] <= 1.0 and 0.0 <= size["rule"]["mean"] <= 1.0


@pytest.mark.slow  # 2 rounds of DP-FedSGD through SecAgg+ and 2 DP-SGD steps, tiny model (~12 s)
def test_secagg_utility_quick_runs_both_settings_through_secure_aggregation(
    tmp_path: Path,
) -> None:
    out = secagg_utility.run(
        True,
        tmp_path,
        preset="tiny",
        # rate 1: the accountant's closed form (a subsampled rate's calibration takes seconds)
        recipe=secagg_utility.Recipe(rounds=2, sample_rate=1.0, learning_rate=1.0),
    )
    demo = out.raw["demo_small"]
    assert set(demo["settings"]) == {"fed-ddp8", "central-dp8"}  # --quick: no local-DP runs
    assert out.key == "secagg_auroc_fed_ddp8_demo_small" and out.key in SUMMARY_KEYS
    assert out.value == demo["settings"]["fed-ddp8"]["mean"]
    assert set(out.extra) == {"secagg_auroc_central_dp8_demo_small"}
    assert 0.0 <= out.value <= 1.0 and demo["epsilon"] <= 8.0 and demo["sites"] == 5


def test_secagg_overhead_splits_a_round_and_restores_what_it_times() -> None:
    """The secure round's parts add up as documented; the stopwatch leaves the code as it was
    (the benchmark itself, 3 federations of 10 sites, takes about a minute: not run here)."""
    parts = {
        "sites train.secagg_keys": 1.0,
        "sites train.secagg_shares": 2.0,
        "sites train.secagg_mask": 50.0,
        "sites train.secagg_reveal": 4.0,
        "coordinator after train.secagg_keys": 0.1,
        "coordinator after train.secagg_shares": 0.2,
        "coordinator after train.secagg_mask": 0.4,
        "coordinator after train.secagg_reveal": 30.0,
        "compute SiteSession.mask": 0.5,
        "compute ServerStep.apply": 9.0,
    }
    assert secagg_overhead.protocol_exchanges_s(parts) == pytest.approx(7.7)
    assert secagg_overhead.protocol_compute_s(parts) == 0.5
    before = (SiteSession.__dict__["load"], SiteSession.mask, client.secure.pack)
    with secagg_overhead.Stopwatch().running() as watch:
        assert SiteSession.mask is not before[1] and client.secure.pack is not before[2]
    assert (SiteSession.__dict__["load"], SiteSession.mask, client.secure.pack) == before
    assert watch.calls == []
    content = RecordDict(
        {"a": ArrayRecord({"x": Array(np.zeros(1000, np.float32))}), "c": ConfigRecord({"k": 1})}
    )
    # the float32 payload, its .npy header, the names
    assert 4000 < secagg_overhead.record_bytes(content) < 4300


@pytest.mark.slow  # 2 federations of the tiny model
def test_tabular_fields_benchmark_compares_two_and_three_modalities(tmp_path: Path) -> None:
    from benchmarks import tabular_fields

    out = tabular_fields.run(
        False,
        tmp_path,
        medpix=tmp_path / "absent.csv",
        preset="tiny",
        seeds=1,
        demo_scale=0.1,
        overrides={**SMOKE, "num-server-rounds": 1},
    )
    two, three = out.raw["two-modalities"], out.raw["three-modalities"]
    assert set(two) == {"all"} and set(three) == {"all", "without-fields", "fields-only"}
    # one seed: no interval, so the target is the two-modality mean
    assert out.value == three["all"]["mean"] and out.target == f">= {two['all']['mean']:.4f}"
    assert all(0.0 <= v["mean"] <= 1.0 for r in out.raw.values() for v in r.values())
