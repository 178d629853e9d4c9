"""Per-case explanations of a trained model: what each modality contributes, which report tokens and
which image regions drive the prediction (`fedfusion predict --explain`).

For the predicted class of each case:
- **modality contribution**: its probability with both modalities, the image only and the report
  only (the other masked as in training: `common.model.contributions.masked`), and the weighted
  fusion's learned weights when the model has them;
- **integrated gradients** (Captum; Sundararajan et al. 2017) of the class logit with respect to
  the image pixels and the report's word embeddings (the text encoder's input layer) together,
  from a baseline of a blank image (zeros after normalisation: the mean colour) and a report of
  padding tokens. By completeness, the attributions sum to the logit's change from the baseline
  (`Attribution.delta` is what numerical integration leaves of it). The image's attributions are
  drawn as a heatmap over the image (PNG per case), the tokens' as highlights (one HTML page).

With structured fields declared (`tabular-fields`), the fields are a third input: their
probability with the fields only, and integrated gradients over each field's token (before the
tabular encoder's mix) from the baseline of every field missing (the learned missing indicators),
so a field's attribution is what its value adds over not knowing it; a missing field gets none.

A missing modality is masked exactly as in training, so it gets no attribution (its gradient is
zero); it has no heatmap or no highlighted report.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from common.data.dataset import ManifestDataset
from common.data.tabular import TABULAR_KEYS
from common.files import atomic_write_bytes
from common.model.contributions import keeps, masked, modality_weights
from common.model.fusion import Features
from common.model.fusion_model import FusionModel
from common.model.trainable import trainable_state
from common.views.plots import figure_png
from tools.predict import Predictor

MAX_TOKENS_SHOWN = 10  # the most influential tokens listed per case
METHOD = "gausslegendre"  # Captum's integration rule


@dataclass(frozen=True, kw_only=True)
class Attribution:
    """Integrated gradients of one case's class logit."""

    image: torch.Tensor  # (3, S, S) per pixel
    text: torch.Tensor  # (T,) per token (summed over the embedding)
    logit: float  # F(x)
    baseline_logit: float  # F(baseline)
    delta: float  # sum of attributions - (F(x) - F(baseline)): the integration's error
    tabular: torch.Tensor | None = None  # (F,) per structured field; None: none declared

    @property
    def totals(self) -> dict[str, float]:
        """The attribution of each modality (sums to the logit's change up to `delta`)."""
        totals = {"image": float(self.image.sum()), "text": float(self.text.sum())}
        if self.tabular is not None:
            totals["tabular"] = float(self.tabular.sum())
        return totals


@dataclass(frozen=True, kw_only=True)
class CaseExplanation:
    """One case: the prediction, each modality's contribution, the tokens and the heatmap."""

    line: int
    image: str
    text: str
    prediction: str
    probabilities: dict[str, float]
    with_modalities: dict[str, float]  # the predicted class' probability: both / image / text
    weights: dict[str, float] | None  # weighted fusion only
    attribution: Attribution
    tokens: list[tuple[str, float]]  # the report's tokens (no special ones) and attributions
    heatmap: str | None  # the PNG's file name; None without an image
    # (field name, attribution) per declared structured field; empty: none declared
    fields: list[tuple[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The case's numbers (explanations.json)."""
        fields = {"field_attributions": dict(self.fields)} if self.fields else {}
        return {
            "line": self.line,
            "image": self.image,
            "prediction": self.prediction,
            "probabilities": self.probabilities,
            "with_modalities": self.with_modalities,
            "fusion_weights": self.weights,
            "attribution_totals": self.attribution.totals,
            "logit": self.attribution.logit,
            "baseline_logit": self.attribution.baseline_logit,
            "completeness_delta": self.attribution.delta,
            "top_tokens": sorted(self.tokens, key=lambda t: -abs(t[1]))[:MAX_TOKENS_SHOWN],
            "heatmap": self.heatmap,
            **fields,
        }


def _logits_from_embeddings(
    model: FusionModel,
    images: torch.Tensor,
    word_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    has_image: torch.Tensor,
    has_text: torch.Tensor,
    field_tokens: torch.Tensor | None = None,
    has_tabular: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's logits (B, C) with the report given as word embeddings (B, T, Dt) and the
    structured fields as their per-field tokens (B, F, D)."""
    image_tokens = model.image(images)
    text_tokens = model.text(
        inputs_embeds=word_embeds, attention_mask=attention_mask
    ).last_hidden_state
    features = Features(image_tokens, text_tokens, attention_mask.bool(), has_image, has_text)
    if model.tabular is not None and field_tokens is not None:
        tokens = model.tabular.from_field_tokens(field_tokens)  # (B, F, D)
        features = features._replace(tabular_tokens=tokens, has_tabular=has_tabular)
    return model.classify(features)


def integrated_gradients(
    model: FusionModel,
    case: dict[str, torch.Tensor],
    target: int,
    *,
    steps: int = 64,
    pad_token_id: int = 0,
) -> Attribution:
    """Captum integrated gradients of logit `target` for one case (batch of one, model's device)."""
    from captum.attr import IntegratedGradients

    model.eval()
    words = model.text.get_input_embeddings()
    images, ids, mask = case["images"], case["input_ids"], case["attention_mask"]
    flags: tuple[torch.Tensor, ...] = (mask, case["has_image"], case["has_text"])
    with torch.no_grad():
        embeds = words(ids)  # (1, T, Dt)
        baseline_embeds = words(torch.full_like(ids, pad_token_id))
        inputs = [images, embeds]
        baselines = [torch.zeros_like(images), baseline_embeds]
        if model.tabular is not None:  # the fields' tokens; baseline: every field missing
            t = model.tabular
            fields = (case["tabular_numeric"], case["tabular_categorical"], case["tabular_missing"])
            inputs.append(t.field_tokens(*fields))  # (1, F, D)
            baselines.append(t.missing_tokens(1))
            flags = (*flags, case["has_tabular"])

    def forward(x: torch.Tensor, e: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if model.tabular is None:
            return _logits_from_embeddings(model, x, e, *rest)
        tokens, m, hi, ht, htab = rest
        return _logits_from_embeddings(model, x, e, m, hi, ht, tokens, htab)

    ig = IntegratedGradients(forward)
    attributions, delta = ig.attribute(
        tuple(inputs),
        baselines=tuple(baselines),
        target=target,
        additional_forward_args=flags,
        n_steps=steps,
        method=METHOD,
        internal_batch_size=steps,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        logit = float(forward(*inputs, *flags)[0, target])
        base = float(forward(*baselines, *flags)[0, target])
    return Attribution(
        image=attributions[0][0].detach().cpu(),
        text=attributions[1][0].sum(-1).detach().cpu(),
        logit=logit,
        baseline_logit=base,
        delta=float(delta.abs().max()),
        tabular=attributions[2][0].sum(-1).detach().cpu() if len(inputs) > 2 else None,
    )


@torch.no_grad()
def modality_probabilities(
    model: FusionModel, case: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Class probabilities (C,) of one case with every modality, image only, report only (and
    fields only, when declared)."""
    features = model.encode(
        case["images"],
        case["input_ids"],
        case["attention_mask"],
        case["has_image"],
        case["has_text"],
        **{k: case[k] for k in TABULAR_KEYS if k in case},
    )
    return {
        keep: torch.softmax(model.classify(masked(features, keep)), -1)[0].cpu()
        for keep in keeps(features)
    }


def heatmap_png(image: torch.Tensor, attribution: torch.Tensor, title: str) -> bytes:
    """The image (3, S, S; normalised) in grey with |attribution| summed over channels on top.

    The heat is averaged over 5 x 5 pixels: per-pixel gradients of a ResNet are speckled.
    """
    gray = image[0].numpy()
    heat = torch.nn.functional.avg_pool2d(
        attribution.abs().sum(0)[None, None], 5, stride=1, padding=2, count_include_pad=False
    )[0, 0].numpy()
    fig = Figure(figsize=(4.0, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.imshow(gray, cmap="gray")
    ax.imshow(heat / max(float(heat.max()), 1e-12), cmap="inferno", alpha=0.5)
    ax.set_title(title, fontsize="small")
    ax.axis("off")
    return figure_png(fig)


def explain_cases(
    predictor: Predictor,
    dataset: ManifestDataset,
    out_dir: Path,
    *,
    steps: int = 64,
    max_cases: int = 20,
) -> list[CaseExplanation]:
    """Explain the first `max_cases` rows of `dataset`; write heatmaps, the page and the numbers."""
    model, device, names = predictor.model, predictor.device, predictor.class_names
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = modality_weights(trainable_state(model))
    pad = predictor.tokenizer.pad_token_id or 0
    special = set(predictor.tokenizer.all_special_ids)
    cases = []
    for i in range(min(len(dataset), max_cases)):
        row = dataset.rows[i]
        item = dataset[i]
        case = {k: v.unsqueeze(0).to(device) for k, v in item.items() if k != "labels"}
        probs = modality_probabilities(model, case)
        target = int(probs["both"].argmax())
        attribution = integrated_gradients(model, case, target, steps=steps, pad_token_id=pad)
        ids = item["input_ids"][item["attention_mask"].bool()].tolist()
        tokens = (
            [
                (tok, float(a))
                for tok, a, t in zip(
                    predictor.tokenizer.convert_ids_to_tokens(ids),
                    attribution.text.tolist(),
                    ids,
                    strict=False,
                )
                if t not in special
            ]
            if bool(item["has_text"])
            else []
        )
        heatmap = None
        if bool(item["has_image"]):
            heatmap = f"case-{row.line}-image.png"
            atomic_write_bytes(
                out_dir / heatmap,
                heatmap_png(item["images"], attribution.image, f"row {row.line}: {names[target]}"),
            )
        cases.append(
            CaseExplanation(
                line=row.line,
                image=str(row.image or ""),
                text=row.text,
                prediction=names[target],
                probabilities={n: float(p) for n, p in zip(names, probs["both"], strict=True)},
                with_modalities={k: float(v[target]) for k, v in probs.items()},
                weights=weights,
                attribution=attribution,
                tokens=tokens,
                heatmap=heatmap,
                fields=_field_attributions(model, attribution),
            )
        )
    atomic_write_bytes(
        out_dir / "explanations.json", json.dumps([c.to_json() for c in cases], indent=2).encode()
    )
    atomic_write_bytes(out_dir / "explanations.html", explanation_page(cases).encode())
    return cases


def _field_attributions(model: FusionModel, a: Attribution) -> list[tuple[str, float]]:
    """(name, attribution) per declared structured field, in schema order."""
    if a.tabular is None:
        return []
    names = [f.name for f in model.config.tabular]
    return [(n, float(v)) for n, v in zip(names, a.tabular.tolist(), strict=True)]


VIEW_HEADERS = {
    "both": "both",
    "image": "image only",
    "text": "report only",
    "tabular": "fields only",
    "no-tabular": "without fields",
}


def _highlight(tokens: list[tuple[str, float]]) -> str:
    """The report's tokens, red for evidence for the class, blue against, by strength."""
    scale = max((abs(a) for _, a in tokens), default=0.0) or 1.0
    spans = []
    for token, a in tokens:
        alpha = min(1.0, abs(a) / scale)
        colour = f"rgba(220,40,40,{alpha:.2f})" if a > 0 else f"rgba(40,90,220,{alpha:.2f})"
        spans.append(
            f'<span title="{a:+.4f}" style="background:{colour};padding:1px 2px;'
            f'border-radius:3px">{html.escape(token)}</span>'
        )
    return " ".join(spans)


def explanation_page(cases: list[CaseExplanation]) -> str:
    """One HTML page: per case the prediction, the modality contributions, tokens and heatmap."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>FedFusion explanations"
        "</title><style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "td,th{padding:2px 8px;text-align:left}</style></head><body>",
        "<h1>Per-case explanations</h1><p>For the predicted class: its probability with both "
        "modalities, the image only and the report only (the other masked as in training); "
        "integrated gradients of its logit, summed per modality (they add up to the logit's "
        "change from a blank image and an empty report); the report's tokens highlighted "
        "(red: for the class, blue: against); the image's attribution as a heatmap.</p>",
    ]
    for c in cases:
        a = c.attribution
        weights = (
            (
                "<p>Learned fusion weights: "
                + ", ".join(f"{m} {w:.3f}" for m, w in c.weights.items())
                + "</p>"
            )
            if c.weights
            else ""
        )
        top = ", ".join(
            f"{html.escape(t)} ({v:+.3f})"
            for t, v in sorted(c.tokens, key=lambda x: -abs(x[1]))[:MAX_TOKENS_SHOWN]
        )
        parts += [
            f"<h2>Row {c.line}: {html.escape(c.prediction)} "
            f"({c.probabilities[c.prediction]:.3f})</h2>",
            "<table><tr><th></th>"
            + "".join(f"<th>{VIEW_HEADERS[k]}</th>" for k in c.with_modalities)
            + f"</tr><tr><td>p({html.escape(c.prediction)})</td>"
            + "".join(f"<td>{p:.3f}</td>" for p in c.with_modalities.values())
            + "</tr></table>",
            weights,
            f"<p>Integrated gradients: image {a.totals['image']:+.3f}, report "
            f"{a.totals['text']:+.3f}"
            + (f", fields {a.totals['tabular']:+.3f}" if "tabular" in a.totals else "")
            + f"; logit {a.logit:.3f} vs {a.baseline_logit:.3f} at the "
            f"baseline (completeness gap {a.delta:.1e}).</p>",
            (
                "<p><b>Structured fields:</b> "
                + ", ".join(f"{html.escape(n)} {v:+.3f}" for n, v in c.fields)
                + "</p>"
            )
            if c.fields
            else "",
            f"<p><b>Report:</b> {_highlight(c.tokens) if c.tokens else '<i>no report</i>'}</p>",
            f"<p>Most influential tokens: {top}</p>" if top else "",
            f"<img src='{html.escape(c.heatmap)}' alt='image attribution'>"
            if c.heatmap
            else "<p><i>no image</i></p>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)
