"""The tabular encoder and the n-modality fusion: without declared fields the model is the
two-modality one bit for bit; with them a missing field or modality is masked, never read;
the untrained set matches autograd; the feature cache is exact."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from common.data.tabular import TABULAR_KEYS
from common.model.feature_cache import CachedFusion, compute_features
from common.model.fusion_model import FusionModel, build_model
from common.model.modalities import untrained_parameters
from common.model.trainable import trainable_names
from common.training.ablation import ablation_scores, exact_metrics
from tests.conftest import tiny_run

FUSIONS = ("concat", "weighted", "attention")
CPU = torch.device("cpu")
SCHEMA = "age:numeric:0:120;sex:categorical:F|M;temp:numeric:34:42;site:categorical:a|b|c"

# The two-modality model at the commit before the tabular modality (tiny preset, seed 0): the
# SHA-256 over its parameters' names and bytes, and its logits on `batch()` (reference numbers)
BEFORE = {
    "concat": (
        "ffa6fe26ac9b3822b8d171f0a260722b39bf3a29a58cbadeb22cfbd20567bd45",
        [
            0.078954,
            -0.083315,
            -0.167696,
            0.133509,
            0.00901,
            -0.169322,
            0.026312,
            -0.024781,
            -0.049692,
            0.048222,
            -0.111418,
            -0.09414,
        ],
    ),
    "weighted": (
        "baed759eb4306aadc7630260c828322e215d15b199ec1026a91cb4431bbe1d52",
        [
            -0.295814,
            0.240642,
            0.189238,
            -0.244129,
            0.479527,
            -0.00471,
            -0.322846,
            0.024352,
            0.428197,
            -0.319909,
            0.155474,
            0.128526,
        ],
    ),
    "attention": (
        "f583cd2d6aa8f02027885ef5fd87d5b2047bf0c4c6b862f5fb225ced264e5203",
        [
            0.201374,
            -0.5779,
            0.174911,
            0.262585,
            -0.796979,
            0.483192,
            0.280459,
            -0.635926,
            0.013123,
            0.343695,
            -0.559266,
            0.081445,
        ],
    ),
}


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images and reports for the tiny preset; rows 1 and 2 lack the report and the image."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 32, dtype=torch.long)
    mask[:, 16:] = 0
    return {
        "images": torch.randn(b, 3, 64, 64, generator=g),
        "input_ids": torch.randint(1000, 2000, (b, 32), generator=g),
        "attention_mask": mask,
        "has_image": torch.tensor([True, True, False, True][:b]),
        "has_text": torch.tensor([True, False, True, True][:b]),
    }


def fields(b: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random structured fields for SCHEMA; about a third of the cells missing."""
    g = torch.Generator().manual_seed(seed)
    missing = torch.rand(b, 4, generator=g) < 0.35
    return {
        "tabular_numeric": torch.rand(b, 2, generator=g) * 2 - 1,
        "tabular_categorical": torch.stack(
            [torch.randint(0, 2, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)], 1
        ),
        "tabular_missing": missing,
        "has_tabular": ~missing.all(dim=1),
    }


def three(fusion: str, **changes: object) -> FusionModel:
    return build_model(tiny_run(fusion=fusion, tabular_fields=SCHEMA, **changes).model)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_without_fields_the_model_is_the_two_modality_one_bit_for_bit(fusion: str) -> None:
    model = build_model(tiny_run(fusion=fusion).model).eval()
    assert model.tabular is None and not any("tabular" in n for n, _ in model.named_parameters())
    want_digest, want_logits = BEFORE[fusion]
    assert digest(model) == want_digest
    with torch.no_grad():
        got = model(**batch()).flatten()
    torch.testing.assert_close(got, torch.tensor(want_logits), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="declares none"):
        model(**batch(), **fields(4))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_missing_field_or_tabular_modality_is_masked_not_read(fusion: str) -> None:
    model = three(fusion).eval()
    x, t = batch(), fields(4)
    t["tabular_missing"][0] = torch.tensor([True, True, True, False])  # row 0: all but `site`
    t["has_tabular"][0], t["has_tabular"][1] = True, False
    t["tabular_missing"][1] = True  # row 1: no field at all
    other = {k: v.clone() for k, v in t.items()}
    other["tabular_numeric"][0, :] += 0.5  # age and temp of row 0: both missing
    other["tabular_categorical"][0, 0] = 1 - other["tabular_categorical"][0, 0]  # sex: missing
    other["tabular_numeric"][1] = -other["tabular_numeric"][1]  # every field of row 1 missing
    other["tabular_categorical"][1] = 1 - other["tabular_categorical"][1].clamp(max=1)
    with torch.no_grad():
        a, b = model(**x, **t), model(**x, **other)
        torch.testing.assert_close(a[:2], b[:2], atol=0, rtol=0)
        present = dict(t, tabular_missing=torch.zeros_like(t["tabular_missing"]))
        changed = dict(present, tabular_numeric=present["tabular_numeric"] + 0.5)
        assert not torch.allclose(model(**x, **present)[3], model(**x, **changed)[3])
    with pytest.raises(ValueError, match="a batch needs"):
        model(**x)


def gradient_free(model: FusionModel, combos: list[tuple[bool, bool, bool]]) -> set[str]:
    """Trainable parameters whose gradient is exactly zero after a batch of these combos."""
    pattern = sorted(combos) * 6
    b = len(pattern)
    x, t = batch(b), fields(b, seed=3)
    x["has_image"] = torch.tensor([c[0] for c in pattern])
    x["has_text"] = torch.tensor([c[1] for c in pattern])
    x["images"] = x["images"] * x["has_image"].view(b, 1, 1, 1)
    t["has_tabular"] = torch.tensor([c[2] for c in pattern])
    # every tabular row has a missing and a present cell of each kind of field
    t["tabular_missing"] = torch.tensor([[True, False, False, True], [False, True, True, False]])[
        torch.arange(b) % 2
    ]
    t["tabular_missing"][~t["has_tabular"]] = True
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(**x, **t)
    nn.functional.cross_entropy(logits, torch.arange(b) % logits.shape[1]).backward()
    params = dict(model.named_parameters())
    return {n for n in trainable_names(model) if params[n].grad is None or not params[n].grad.any()}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_untrained_set_matches_autograd_for_three_modalities(fusion: str) -> None:
    model = three(fusion)
    tabular_only, image_only = (False, False, True), (True, False, False)
    for combos in (
        [tabular_only],
        [image_only],
        [(True, True, False), tabular_only],
        [(True, True, True)],
    ):
        assert set(untrained_parameters(model, combos)) == gradient_free(model, combos), combos
    image_site = untrained_parameters(model, [image_only])
    assert {n for n in trainable_names(model) if n.startswith("tabular.")} <= set(image_site)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_cached_features_give_the_full_models_logits(fusion: str) -> None:
    model = three(fusion, trainable_image_blocks=1)
    x, t = batch(), fields(4)
    dataset = [
        {**{k: v[i] for k, v in {**x, **t}.items()}, "labels": torch.tensor(0)} for i in range(4)
    ]
    net = CachedFusion(model)
    cached = compute_features(net, dataset, torch.device("cpu"))  # type: ignore[arg-type]
    assert set(TABULAR_KEYS) <= set(cached.tensors)
    model.eval()
    with torch.no_grad():
        items = {k: v for k, v in cached.tensors.items() if k != "labels"}
        torch.testing.assert_close(net(**items), model(**x, **t), atol=1e-5, rtol=1e-5)


def test_ablation_scores_the_fields_only_and_every_modality_but_them() -> None:
    model = three("weighted").eval()
    x, t = batch(), fields(4)
    scores = ablation_scores(model, [{**x, **t, "labels": torch.tensor([0, 1, 2, 0])}], CPU)
    assert set(scores.logits) == {"both", "image", "text", "tabular", "no-tabular"}
    no = torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        without = model(**x, **{**t, "has_tabular": no})
        only = model(**{**x, "has_image": no, "has_text": no}, **t)
    torch.testing.assert_close(scores.logits["no-tabular"], without, atol=0, rtol=0)
    torch.testing.assert_close(scores.logits["tabular"], only, atol=0, rtol=0)
    _, ablation = exact_metrics(scores)
    assert ablation.num_examples == 2 and ablation.tabular is not None  # rows 0 and 3 have both
    assert ablation.no_tabular is not None


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_step_trains_the_tabular_encoder_in_both_opacus_modes(mode: str) -> None:
    from torch.utils.data import DataLoader

    from common.model.trainable import trainable_state
    from common.privacy.accounting import Account
    from common.privacy.dpsgd import private_training

    model = three("weighted")
    x, t = batch(4), fields(4)
    t["tabular_missing"][:, 0] = False  # age present everywhere: its direction has a gradient
    t["has_tabular"][:] = True
    rows = [
        {**{k: v[i] for k, v in {**x, **t}.items()}, "labels": torch.tensor(i % 3)}
        for i in range(4)
    ]
    before = trainable_state(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    account = Account(accountant="rdp", delta=1e-5, noise_multiplier=1.0, sample_rate=1.0)
    loader = DataLoader(rows, batch_size=4)
    with private_training(
        model, optimizer, loader, account, max_grad_norm=1.0, grad_sample_mode=mode
    ) as session:
        for b in session.loader:
            session.optimizer.zero_grad()
            labels = b.pop("labels")
            session.criterion(model(**b), labels).backward()
            session.optimizer.step()
        assert session.engine.accountant.history == [(1.0, 1.0, 1)]
    after = trainable_state(model)
    tabular = [n for n in after if n.startswith("tabular.")]
    assert tabular and all(not torch.equal(after[n], before[n]) for n in tabular)
