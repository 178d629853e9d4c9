"""A run report for those who answer for a federation: one self-contained HTML or Markdown file.

It is built from what the server wrote to the run folder (run-config.json, model.json,
history.jsonl, summary.json), never from the sites: the sites and their sizes, the rounds,
the final metrics per site, the model, each site's privacy guarantee in words a data protection
officer can check against the site's own receipts, and the plots (embedded as base64 PNG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import protocol as R
from common.errors import ConfigurationError
from common.model.checkpoint import ModelCard, read_model_card
from common.model.contributions import reliance
from common.runfolder import (
    HISTORY,
    HistoryLine,
    Metrics,
    RunFolder,
    RunSettings,
    Summary,
)
from common.views.plots import (
    METRIC_PLOTS,
    figure_png,
    plot_ablation,
    plot_epsilon,
    plot_metric,
    plot_modality_weights,
)
from tools.report_format import (
    Block,
    Heading,
    Image,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)

FORMATS = ("html", "md")


class ReportError(ConfigurationError):
    """The folder cannot be reported on; the message says what is missing and what to do."""


@dataclass(frozen=True, kw_only=True)
class RunRecords:
    """What the coordinator wrote to a run folder."""

    name: str
    history: list[HistoryLine]
    settings: RunSettings | None
    model: ModelCard | None
    summary: Summary | None


def load_run(run_dir: Path) -> RunRecords:
    """The run folder's records: run config, model card, history lines and summary."""
    if not run_dir.is_dir():
        raise ReportError(
            f"{run_dir} is not a folder. Pass a run folder such as "
            "outputs/<run-name> (the server writes one per run)."
        )
    if not (run_dir / HISTORY).is_file():
        raise ReportError(
            f"{run_dir} holds no {HISTORY}: it is not a FedFusion run folder, or the "
            "run has not finished a round yet."
        )
    folder = RunFolder(run_dir)
    return RunRecords(
        name=folder.name,
        history=folder.read_history(),
        settings=folder.read_settings(),
        model=read_model_card(run_dir),
        summary=folder.read_summary(),
    )


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _recorded(value: float | None) -> float:
    """A metric the history always records as a number (None raises, as arithmetic on it did)."""
    if value is None:
        raise TypeError("a metric that is always recorded as a number is None.")
    return value


@dataclass
class SiteFacts:
    """One site over the run: its last train and evaluate metrics, and its rounds."""

    train: Metrics | None = None
    evaluate: Metrics | None = None
    eval_round: int | None = None
    trained: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def site_facts(history: list[HistoryLine]) -> dict[str, SiteFacts]:
    """Per site: last train metrics, last evaluation (with round), rounds trained/refused/failed."""
    sites: dict[str, SiteFacts] = {}
    for line in history:
        for name, s in line.sites.items():
            facts = sites.setdefault(name, SiteFacts())
            if s.train is not None:
                facts.train = s.train
                facts.trained.append(line.round)
            if s.evaluate is not None:
                facts.evaluate, facts.eval_round = s.evaluate, line.round
        for name in line.refusals:
            sites.setdefault(name, SiteFacts()).refused.append(line.round)
        for name in line.failures:
            sites.setdefault(name, SiteFacts()).failed.append(line.round)
    return dict(sorted(sites.items()))


def _overview(run: RunRecords, sites: dict[str, SiteFacts]) -> list[Block]:
    planned = (
        run.settings.settings.get("federation", {}).get("num_server_rounds", "?")
        if run.settings
        else "?"
    )
    done = sum(line.finished for line in run.history)
    status = (
        run.summary.message
        if run.summary
        else "No summary.json: the run did not finish (it may still run)."
    )
    rows = [
        [
            name,
            _fmt((f.train or {}).get(R.NUM_EXAMPLES)),
            _fmt((f.evaluate or {}).get(R.NUM_EXAMPLES)),
            _rounds(f.trained),
            _rounds(f.refused),
            _rounds(f.failed),
        ]
        for name, f in sites.items()
    ]
    state = run.summary.status if run.summary else "unknown"
    return [
        Paragraph(
            f"Status: {state}. {status} Rounds completed: "
            f"{done} of {planned} planned. Every number below comes from the "
            "coordinator's records in the run folder."
        ),
        Heading(2, "Sites"),
        Table(
            [
                "site",
                "training records",
                "validation records",
                "rounds trained",
                "rounds refused",
                "rounds failed",
            ],
            rows,
        ),
    ]


def _rounds(rounds: list[int]) -> str:
    return ", ".join(map(str, rounds)) or "none"


def _final_metrics(run: RunRecords, sites: dict[str, SiteFacts]) -> list[Block]:
    rows = [
        [
            name,
            _fmt(f.eval_round),
            _fmt((f.evaluate or {}).get(R.NUM_EXAMPLES)),
            *(_fmt((f.evaluate or {}).get(k)) for k in (R.LOSS, R.ACCURACY, R.AUROC, R.F1)),
        ]
        for name, f in sites.items()
    ]
    last = next((line for line in reversed(run.history) if line.aggregate is not None), None)
    if last:
        a = last.aggregate or {}
        total = sum(
            int(_recorded(f.evaluate.get(R.NUM_EXAMPLES, 0)))
            for f in sites.values()
            if f.evaluate and f.eval_round == last.round and not f.evaluate.get(R.EXTERNAL)
        )
        rows.append(
            [
                f"pooled (round {last.round})",
                _fmt(last.round),
                _fmt(total or None),
                *(_fmt(a.get(k)) for k in (R.LOSS, R.ACCURACY, R.AUROC, R.F1)),
            ]
        )
        if a.get(f"{R.EXTERNAL}-{R.AUROC}") is not None:
            rows.append(
                [
                    f"external validation (round {last.round})",
                    _fmt(last.round),
                    _fmt(a.get(f"{R.EXTERNAL}-{R.NUM_EXAMPLES}")),
                    *(
                        _fmt(a.get(f"{R.EXTERNAL}-{k}"))
                        for k in (R.LOSS, R.ACCURACY, R.AUROC, R.F1)
                    ),
                ]
            )
    blocks: list[Block] = [
        Heading(2, "Final metrics per site"),
        Paragraph(
            "Each site evaluates the global model on its own validation split (patients "
            "held out of its training data); the row shows the last round it evaluated and "
            "how many validation records its metrics rest on. The pooled row is over every "
            "training site's validation records. Evaluation-only sites (policy "
            "`evaluate-only`) never train and evaluate all their records: they are pooled "
            "apart, as an external validation."
        ),
        Table(["site", "round", "validation records", "loss", "accuracy", "AUROC", "F1"], rows),
    ]
    small = {
        name: int(_recorded(f.evaluate[R.NUM_EXAMPLES]))
        for name, f in sites.items()
        if f.evaluate and _recorded(f.evaluate.get(R.NUM_EXAMPLES, 0)) < SMALL_VALIDATION
    }
    if small:
        listed = ", ".join(f"{name} ({n})" for name, n in small.items())
        blocks.append(
            Paragraph(
                f"Warning: {listed} validate on fewer than {SMALL_VALIDATION} records. An AUROC "
                "on so few patients swings by 0.1 or more from split to split (a 95% interval of "
                "about +-0.2 at 20 records): read these values as noise, not as evidence that the "
                "model learned; measure the model on a larger held-out set."
            )
        )
    return blocks


def _trainable_groups(names: list[str]) -> str:
    """Trainable parameter names grouped by module (`fusion`, `head`, `text.encoder.layer.5`)."""
    groups: list[str] = []
    for name in names:
        parts = name.split(".")[:-1]
        group = ".".join(parts[:4] if parts and parts[0] in ("text", "image") else parts[:1])
        if group not in groups:
            groups.append(group)
    return ", ".join(groups)


SMALL_VALIDATION = (
    30  # fewer validation records: the report warns that the site's metrics are noise
)
RANDOM_IMAGE_WARNING = (
    "Warning: the image encoder is a seeded random initialisation (no "
    "image-weights): its features carry little of the images' content, so the "
    "model learns almost only from the reports. Set image-weights (a local "
    "torchvision state dict, or a torchvision weight name such as "
    "IMAGENET1K_V1 found in the torch hub cache)."
)


def _model(run: RunRecords) -> list[Block]:
    card = run.model
    if card is None:
        return [
            Heading(2, "Model"),
            Paragraph("No model.json: the run did not write its final model."),
        ]
    cfg, counts = card.config, card.parameters
    total, trainable = counts.get("total"), counts.get("trainable")
    rows = [
        ["preset", cfg.preset],
        ["fusion mode", cfg.fusion],
        [
            "image encoder",
            cfg.image_encoder
            + (f" (weights {cfg.image_weights})" if cfg.image_weights else " (seeded init)"),
        ],
        ["text encoder", cfg.text_encoder],
        ["classes", ", ".join(cfg.class_names)],
        ["trainable set", _trainable_groups(card.trainable)],
        [
            "parameters",
            f"{total:,} total, {trainable:,} trainable (exchanged each round), "
            f"{total - trainable:,} frozen"
            if total is not None and trainable is not None
            else "not recorded",
        ],
        ["frozen-part fingerprint (SHA-256)", card.frozen_fingerprint],
    ]
    warning = [] if cfg.image_weights else [Paragraph(RANDOM_IMAGE_WARNING)]
    return [Heading(2, "Model"), Table(["item", "value"], rows), *warning]


def privacy_statement(name: str, facts: SiteFacts, accountant: str) -> str:
    """A site's guarantee (or its absence) in plain words, with every number needed to check it."""
    m = facts.train
    if m is None:
        return f"{name} did not train in this run: no update computed from its data left the site."
    eps = m.get(R.EPSILON)
    if eps is None:
        return (
            f"{name} trained in rounds {_rounds(facts.trained)} without differential "
            "privacy: the updates it sent carry no formal privacy guarantee."
        )
    delta, sigma = m[R.DELTA], _recorded(m[R.NOISE_MULTIPLIER])
    clip, cap, n = m.get(R.MAX_GRAD_NORM), m.get(R.EPSILON_CAP), m.get(R.NUM_EXAMPLES)
    clip_text = f"{clip:g}" if isinstance(clip, (int, float)) else "the run's max-grad-norm"
    noise_text = f" = {sigma * clip:.3f}" if isinstance(clip, (int, float)) else ""
    cap_text = f" (its cap for this run: {cap:g})" if isinstance(cap, (int, float)) else ""
    delta_text = (
        f" (1 / training records = {1 / n:.2g}: delta should be well below it)"
        if isinstance(n, int) and n > 0
        else ""
    )
    return (
        f"{name} trained in rounds {_rounds(facts.trained)} with DP-SGD (Abadi et al., 2016), "
        f"{m[R.STEPS]} local steps in all. Each step drew a batch by including every training "
        f"record independently with probability {m[R.SAMPLE_RATE]:.4f}, clipped each record's "
        f"gradient to norm {clip_text}, and added Gaussian noise of standard deviation "
        f"{sigma:.3f} x {clip_text}{noise_text} to their sum. The Opacus {accountant.upper()} "
        f"accountant bounds the privacy loss of all its rounds together at epsilon = {eps:.3f} "
        f"with delta = {delta:g}{cap_text}. Meaning: for any single training record, the "
        f"probability of anything the coordinator received from {name} changes by at most a "
        f"factor e^epsilon = {math.exp(eps):.3g} whether or not that record was used, except with "
        f"probability at most delta{delta_text}."
    )


NOT_COVERED = (
    "What the guarantee does not cover. Releases that are not noised: each site's validation "
    "metrics (rounded, and only from a split of at least the policy's min-eval-records; a site "
    "with share-metrics = false releases none), with its modality ablation (share-ablation), "
    "and training loss; its numbers of training and "
    "validation records; the names of the trainable parameters it did not train (which tell "
    "which modalities its training records have); its training time; the privacy terms "
    "themselves (epsilon, delta, noise, sampling rate, steps: derived from its policy and its "
    "record count); its name; and the kind and fixed reason of a refusal or an error. Also not "
    "covered: patients with several records (the protection is per record, so a patient with k "
    "records is protected at roughly k times epsilon); other runs on the same data when the "
    'site\'s policy sets budget-scope = "run" (the default, "dataset", composes them); the '
    "frozen part of the model, which must not have been trained on the site's data; and a site "
    "that does not run its own installed FedFusion node (the guarantee rests on the site's own "
    "software enforcing its policy)."
)
HOW_TO_CHECK = (
    "How to check: at each site, `fedfusion privacy report <state-dir>` re-derives every "
    "round's epsilon from the site's own receipts with a fresh Opacus accountant; the SHA-256 of "
    "each update the coordinator received (update-sha256 in history.jsonl) matches the receipt "
    "of what the site sent."
)


def _privacy(run: RunRecords, sites: dict[str, SiteFacts]) -> list[Block]:
    accountant = (
        run.settings.settings.get("privacy", {}).get("accountant", "unknown")
        if run.settings
        else "unknown"
    )
    rows = []
    for name, f in sites.items():
        m = f.train or {}
        dp = f.train is not None and m.get(R.EPSILON) is not None
        rows.append(
            [
                name,
                _fmt(m.get(R.EPSILON)) if dp else ("off" if f.train else "-"),
                f"{m[R.DELTA]:g}" if dp else "-",
                _fmt(m.get(R.NOISE_MULTIPLIER)) if dp else "-",
                _fmt(m.get(R.MAX_GRAD_NORM), 2) if dp else "-",
                _fmt(m.get(R.SAMPLE_RATE), 4) if dp else "-",
                accountant if dp else "-",
                _fmt(m.get(R.STEPS)) if dp else "-",
                _fmt(m.get(R.EPSILON_CAP), 2) if dp else "-",
            ]
        )
    blocks: list[Block] = [
        Heading(2, "Privacy per site"),
        Paragraph(
            "Sample-level (epsilon, delta)-differential privacy, per site, cumulative over "
            "this run. Each site enforces the stricter of the coordinator's target and its "
            "own policy; epsilons are never averaged across sites."
        ),
        Table(
            [
                "site",
                "epsilon",
                "delta",
                "noise multiplier",
                "clipping norm",
                "sampling rate",
                "accountant",
                "steps",
                "epsilon cap",
            ],
            rows,
        ),
    ]
    blocks += [Paragraph(privacy_statement(name, f, accountant)) for name, f in sites.items()]
    return [*blocks, Paragraph(NOT_COVERED), Paragraph(HOW_TO_CHECK)]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def modality_sentence(aggregate: Metrics) -> str:
    """ "The model relies on the report for X% of its AUROC" (and on the structured fields for
    Y%, when the sites released their views), from an aggregate's ablation."""
    both, image, text = (
        aggregate.get(k) for k in (R.AUROC_BOTH, R.AUROC_IMAGE_ONLY, R.AUROC_TEXT_ONLY)
    )
    on_report = reliance(both, image)
    if on_report is None:
        return (
            "No modality ablation to summarise: the sites withheld it (share-ablation = "
            "false, or too few validation rows with both modalities) or the AUROC with both "
            "modalities is not above chance."
        )
    sentence = (
        f"The model relies on the report for {_percent(on_report)} of its AUROC: on the "
        f"validation rows with both modalities its AUROC is {both:.3f} with both, "
        f"{_fmt(image)} with the image only (report masked) and {_fmt(text)} with the report "
        "only (image masked); the share is (both - image only) / (both - 0.5), the part of "
        "the AUROC above chance that masking the report takes away."
    )
    fields, without = aggregate.get(R.AUROC_FIELDS_ONLY), aggregate.get(R.AUROC_WITHOUT_FIELDS)
    on_fields = reliance(both, without)
    if on_fields is None:
        return sentence
    return (
        f"{sentence} It relies on the structured fields for {_percent(on_fields)}: "
        f"{_fmt(without)} without them (fields masked) and {_fmt(fields)} with the fields only."
    )


# the ablation's columns: (header, metric), and the share a masked modality carries
REPORT_COLUMNS = (
    ("AUROC both", R.AUROC_BOTH),
    ("AUROC image only", R.AUROC_IMAGE_ONLY),
    ("AUROC report only", R.AUROC_TEXT_ONLY),
)
FIELDS_COLUMNS = (
    ("AUROC fields only", R.AUROC_FIELDS_ONLY),
    ("AUROC without fields", R.AUROC_WITHOUT_FIELDS),
)


def _ablation_row(metrics: Metrics, fields: bool) -> list[str]:
    """One row of the modality table: the AUROCs and the shares the report (and fields) carry."""
    both = metrics.get(R.AUROC_BOTH)
    row = [_fmt(metrics.get(k)) for _, k in REPORT_COLUMNS]
    row.append(_percent(reliance(both, metrics.get(R.AUROC_IMAGE_ONLY))))
    if fields:
        row += [_fmt(metrics.get(k)) for _, k in FIELDS_COLUMNS]
        row.append(_percent(reliance(both, metrics.get(R.AUROC_WITHOUT_FIELDS))))
    return row


def _modalities(run: RunRecords, sites: dict[str, SiteFacts]) -> list[Block]:
    declared = (run.settings.settings if run.settings else {}).get("model", {})
    fields = bool(declared.get("tabular_fields"))
    rows = [
        [name, _fmt(f.eval_round), *_ablation_row(f.evaluate or {}, fields)]
        for name, f in sites.items()
    ]
    last = next((line for line in reversed(run.history) if line.aggregate is not None), None)
    if last:
        rows.append(
            [
                f"all sites (round {last.round})",
                _fmt(last.round),
                *_ablation_row(last.aggregate or {}, fields),
            ]
        )
    headers = ["site", "round", *(h for h, _ in REPORT_COLUMNS), "relies on the report"]
    if fields:
        headers += [*(h for h, _ in FIELDS_COLUMNS), "relies on the fields"]
    blocks: list[Block] = [
        Heading(2, "What the model uses"),
        Paragraph(modality_sentence(last.aggregate or {}) if last else "No finished round."),
        Paragraph(
            "Each site scores its validation rows that have both an image and a report three "
            "times: with both, with the report masked and with the image masked, exactly as a "
            "missing modality is masked in training"
            + (
                "; with structured fields declared, twice more: with the fields only and with "
                "the fields masked. "
                if fields
                else ". "
            )
            + "A site releases these numbers only if its policy allows (share-ablation) and "
            "enough of its rows have both modalities."
        ),
        Table(headers, rows),
    ]
    weights = next(
        (line.modality_weights for line in reversed(run.history) if line.modality_weights), None
    )
    if weights:
        blocks += [
            Paragraph(
                "The weighted fusion learns one weight per modality (Z = sum_i w_i * "
                "phi(M_i), the weights renormalised over the modalities a case has). "
                "After the last round: "
                + ", ".join(f"{m} {w:.3f}" for m, w in weights.items())
                + "."
            ),
            Image(
                "learned fusion weights per round", figure_png(plot_modality_weights(run.history))
            ),
        ]
    return [
        *blocks,
        Image(
            "aggregated AUROC on the rows with both modalities, per kept modality",
            figure_png(plot_ablation(run.history)),
        ),
    ]


def _plots(history: list[HistoryLine]) -> list[Block]:
    images = [
        Image(label, figure_png(plot_metric(history, key, label)))
        for key, label in METRIC_PLOTS.values()
    ]
    images.append(
        Image(
            "cumulative epsilon per site (dotted: the site's cap)",
            figure_png(plot_epsilon(history)),
        )
    )
    return [Heading(2, "Curves"), *images]


def report_blocks(run: RunRecords) -> list[Block]:
    """The report's content, independent of its format."""
    sites = site_facts(run.history)
    return [
        Heading(1, f"FedFusion run report: {run.name}"),
        *_overview(run, sites),
        *_final_metrics(run, sites),
        *_modalities(run, sites),
        *_model(run),
        *_privacy(run, sites),
        *_plots(run.history),
    ]


def write_report(run_dir: Path, fmt: str = "html", out: Path | None = None) -> Path:
    """Write the report of `run_dir` as `report.html` or `report.md` (or `out`); return its path."""
    if fmt not in FORMATS:
        raise ReportError(f"Unknown report format {fmt!r}; use one of {list(FORMATS)}.")
    blocks = report_blocks(load_run(run_dir))
    text = to_html(blocks) if fmt == "html" else to_markdown(blocks)
    path = out or run_dir / f"report.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
