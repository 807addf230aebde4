"""What an audit runs: attacks, attacker views and their knobs (``AuditConfig``, the CLI's defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Vector attacks run by default (names in ``attacks.REGISTRY``).
DEFAULT_ATTACKS = (
    "gap",
    "confidence",
    "entropy",
    "modified_entropy",
    "nn_sorted",
    "shokri",
    "shokri_one",
    "inference_model",
)
#: What the attacker knows. ``shadow`` and ``known`` need no defense; the others use the attacker's
#: copy of it (``--adaptive`` selects all).
VIEWS = ("shadow", "adaptive", "flipped", "known", "rounded", "repeated")


@dataclass
class AuditConfig:
    bundle: Path
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"epsilon": 0.5}
    url: str | None = None  # audit a running deployment instead of the in-process gateway
    api_key: str | None = None
    noise_secret: str | None = None  # in-process only; needed for randomized defenses outside --demo
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    views: tuple[str, ...] = ("shadow",)
    #: Label-only attacks to run (they query the target: ``label_only_rows`` members and as many
    #: non-members, ``label_only_queries`` queries per row at most).
    label_only: tuple[str, ...] = ()
    label_only_rows: int = 250
    label_only_queries: int = 200
    label_only_copies: int = 20  # noise robustness: perturbed copies per row
    lira_shadows: Path | None = None  # reference models from `defense_models shadows`
    #: Audit a seeded sample of this many evaluation members and as many non-members (None: all of them). Each
    #: defended row costs the defense's time in every view and in LiRA's references (MemGuard: ms a row).
    eval_rows: int | None = None
    known_fraction: float = 0.5  # view "known": share of evaluation records the attacker knows
    round_decimals: int = 2  # view "rounded"
    repeats: int = 5  # view "repeated": queries averaged per record
    jitter: float = 1e-4  # view "repeated": uniform input jitter making each copy a new query
    #: The scraper attacker: this many members and non-members queried one at a time, reading /metrics on the
    #: clients' port before and after each (0: off). It gets nothing unless that port serves the metrics.
    metrics_probe_rows: int = 0
    #: The timing attacker: this many members and non-members, each queried alone ``timing_probe_repeats`` times
    #: and timed (0: off). Over HTTP it measures what a client sees, pacing of the responses included.
    timing_probe_rows: int = 0
    timing_probe_repeats: int = 3
    timing_probe_copies: int = 1  # copies of the row per query (amplifies its work)
    shadow_epochs: int | None = None  # override the target recipe's epochs for the shadow model
    #: Where the shadow model's training data comes from (``attacker_data``: real, noisy, marginal,
    #: model) and the source's options (e.g. {"flip": 0.2}, {"max_queries": 100000}).
    attacker_data: str = "real"
    attacker_data_params: dict[str, Any] = field(default_factory=dict)
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: For a bundle without a recorded split (``export``: the user's own model): the dataset the split
    #: file indexes, and the file (``.npz`` with index arrays target_train = evaluation members,
    #: eval_nonmember, shadow_in, shadow_out). Also overrides a bundle's own split.
    dataset: str | None = None
    data_path: Path | None = None
    split_file: Path | None = None
    #: The attacker's shadow architecture where the bundle records none (default: our recipe for the
    #: dataset's family).
    shadow_arch: str | None = None
    seed: int = 0
    progress: bool = True
