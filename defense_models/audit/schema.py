"""The audit's file contracts: ``report.json`` (one audit) and ``sweep.json`` (many), versioned.

Written with ``model_dump`` and read back with ``model_validate`` (``sweep --resume``, ``bench/summarize.py``),
so a renamed or missing field fails when a file is read, not hours into a sweep. Bump ``schema_version``
when a field changes meaning; files of another version are refused with the command that regenerates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

SCHEMA_VERSION = 1


class _Record(BaseModel):
    # Thresholds can be ±inf (a score every record clears): written as JSON's Infinity, read back as floats.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class AttackResult(_Record):
    """One attack in one view: ``scoring.AttackScores`` plus what the attack itself reports."""

    balanced_accuracy: float  # at the threshold the attacker set on its own data
    oracle_balanced_accuracy: float  # best threshold on the evaluation sets: an upper bound
    precision: float
    recall: float
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    #: its 95% seeded bootstrap interval (``scoring.tpr_interval``); None in reports written before it existed
    tpr_at_01pct_fpr_low: float | None = None
    tpr_at_01pct_fpr_high: float | None = None
    advantage: float
    threshold: float
    n_members: int
    n_nonmembers: int
    seconds: float | None = None
    orientation: float | None = None  # view "flipped": -1 when the attacker flipped the score
    # label-only attacks
    flip_rate: float | None = None
    max_queries_per_row: int | None = None
    queries_to_target: int | None = None
    queries_per_row: float | None = None
    label_only_floor_on_rows: float | None = None  # they query a subsample: the floor on those rows
    reference_models: int | None = None  # LiRA
    reference_replacement: str | None = None  # LiRA: the training-time defense its references copy ("none": plain)


class L1Stats(_Record):
    mean: float
    median: float
    p90: float
    p99: float
    max: float


class Utility(_Record):
    train_accuracy: float
    test_accuracy: float
    undefended_test_accuracy: float
    label_only_floor: float
    label_loss: float
    l1: L1Stats
    l1_members: L1Stats
    l1_nonmembers: L1Stats
    exact_repeats_identical: float | None  # share of repeated queries answered bit-identically
    #: ... and of queries jittered by ±``jitter`` (near-duplicates) answered within 1e-3 in L1 of the original
    #: (the same draw; their clean outputs differ by ~1e-4, so bit-identity is not expected).
    near_repeats_agree: float | None = None
    #: What the defense costs users, on the evaluation non-members against their true labels.
    top5_accuracy: float | None = None
    undefended_top5_accuracy: float | None = None
    ece: float | None = None  # expected calibration error (15 bins)
    undefended_ece: float | None = None
    nll: float | None = None  # mean negative log-likelihood
    undefended_nll: float | None = None


class BestAttack(_Record):
    attack: str
    balanced_accuracy: float
    auc: float


class Summary(_Record):
    best_attack: BestAttack | None
    best_confidence_based: BestAttack | None
    confidence_based_within_1pt_of_floor: bool
    max_tpr_at_01pct_fpr: float


class BundleRef(_Record):
    name: str
    version: str
    replacement: str | None  # the training-time defense the bundle serves, if any


class AttackerData(_Record):
    source: str
    queries_to_target: int = 0
    records_in: int | None = None
    records_out: int | None = None
    params: dict[str, Any] = {}


class Sets(_Record):
    members: int
    nonmembers: int
    shadow_in: int
    shadow_out: int


class MetricsProbe(_Record):
    """The scraper attacker: /metrics read on the clients' port before and after each single-row query."""

    status: int  # what GET /metrics answered there
    reachable: bool
    rows: int = 0  # members queried (as many non-members)
    auc: float | None = None  # of the L1 bucket each query landed in, the better orientation
    balanced_accuracy: float | None = None  # at the best threshold on these rows: the scraper's best case


class TimingProbe(_Record):
    """The timing attacker: each single-row query timed, members vs. non-members, scored on the fastest answer."""

    rows: int  # members queried (as many non-members)
    repeats: int  # queries per row
    copies: int = 1  # copies of the row in each query
    over_http: bool  # timed through the endpoint (else the in-process defense: no network noise)
    auc: float  # of the fastest answer's latency, the better orientation
    balanced_accuracy: float  # at the best threshold on these rows: the attacker's best case
    noise_auc_95: float  # 95th percentile of ``auc`` with the labels shuffled: latency independent of membership
    p_value: float  # share of shuffles scoring at least ``auc`` (small: latency does depend on membership)
    member_median_ms: float
    nonmember_median_ms: float


class AuditReport(_Record):
    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    bundle: BundleRef
    target: str
    defense: str
    defense_params: dict[str, Any]
    defended: bool
    views: dict[str, str]  # view (or family) -> what the attacker knows
    attacker_data: AttackerData
    utility: Utility
    attacks: dict[str, AttackResult]  # "view/attack" -> result
    per_class_balanced_accuracy: dict[str, dict[int, float]]
    summary: Summary
    sets: Sets
    seconds: float
    metrics_probe: MetricsProbe | None = None
    timing_probe: TimingProbe | None = None


class SweepRow(_Record):
    setting: str
    slug: str
    curve: str | None
    x: float | None
    defense: str
    params: dict[str, Any]
    attacker_data: AttackerData
    replacement: str | None
    test_accuracy: float
    undefended_test_accuracy: float
    train_accuracy: float
    label_loss: float
    mean_l1: float
    label_only_floor: float
    best_attack: str
    best_balanced_accuracy: float
    best_confidence_based: str | None
    best_confidence_based_accuracy: float | None
    best_confidence_based_auc: float | None
    max_tpr_at_1pct_fpr: float
    max_tpr_at_01pct_fpr: float
    attacks: dict[str, dict[str, float]]  # "view/attack" -> balanced_accuracy, auc, tpr_at_1pct_fpr, tpr_at_01pct_fpr
    utility: Utility | None = None  # the report's, whole (calibration, top-5, repeats)


class Sweep(_Record):
    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    rows: list[SweepRow]


M = TypeVar("M", bound=BaseModel)


def read(model: type[M], path: Path) -> M:
    """A report or sweep file, validated; a file from another schema version says how to regenerate it."""
    try:
        return model.model_validate_json(Path(path).read_text())
    except ValidationError as exc:
        raise ValueError(f"{path} does not match this version's {model.__name__} (schema {SCHEMA_VERSION}): "
                         f"re-run the audit or sweep that wrote it\n{exc}") from exc  # fmt: skip


def write(record: BaseModel, path: Path) -> None:
    Path(path).write_text(record.model_dump_json(indent=2) + "\n")
