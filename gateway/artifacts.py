"""Artifact bundles: a directory with ``manifest.json``, ``model.onnx`` and defense weights.

The manifest is the contract between the offline job (which writes it, atomically) and the
gateway (which loads it unchanged). Every file listed in ``files`` is checked against its
SHA-256 before anything is served; a mismatch or a missing file refuses startup with a message
that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import BundleError


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: a reader (another shard sharing
    a directory) sees the old file or the whole new one, never a partial write; a failed write leaves no trace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


MANIFEST_NAME = "manifest.json"
#: 2: ``training`` became a typed, versioned ``TrainingRecord`` (1 held a free-form dict).
FORMAT_VERSION = 2
_REBUILD_HINT = "re-run `python -m defense_models train ... --out DIR` (or `export`) to rebuild the bundle"


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    width: int = Field(ge=1)
    dtype: Literal["float32"] = "float32"


class OutputSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    #: ``logits`` (preferred: MemGuard works on logits) or ``probabilities`` (rows on the simplex).
    kind: Literal["logits", "probabilities"]
    classes: int = Field(ge=2)


class DefenseQuality(BaseModel):
    """What the offline job measured for one defense on held-out defender's rows (its quality gate).

    "Flagged" rows are those the defender's classifier calls members on their clean outputs: the
    rows the defense exists to move. A defense that perturbs few of them is close to a no-op.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    held_out_members: int = Field(ge=0)
    held_out_nonmembers: int = Field(ge=0)
    #: The defender's classifier (g, or AEPPT's substitute) on clean held-out outputs.
    classifier_balanced_accuracy: float
    #: AEPPT: the substitute again, on the defended outputs (the calibrated step aims at 0.5).
    classifier_balanced_accuracy_defended: float | None = None
    #: MemGuard: share of rows needing noise whose first Phase I round succeeded.
    phase_one_success: float | None = None
    flagged_share: float
    perturbed_share: float  # of all held-out rows moved by at least 1e-3 in L1
    perturbed_share_flagged: float | None  # None when the classifier flags no row
    mean_l1: float
    label_loss: float
    params: dict[str, Any] = Field(default_factory=dict)  # the parameters it was measured at
    problems: list[str] = Field(default_factory=list)  # why the gate would refuse it; empty: passed
    #: Written despite ``problems`` (``--allow-weak-defense``).
    override: bool = False

    @property
    def passed(self) -> bool:
        return not self.problems


class DefenseEntry(BaseModel):
    """Weights (relative path in the bundle) and calibrated parameters of one defense."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    quality: DefenseQuality | None = None


class SelfAuditRow(BaseModel):
    """One line of the export's self-audit: the best confidence-based attack against one defense."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    defense: str
    best_attack: str
    balanced_accuracy: float  # at the threshold the attack learned on the other half of the rows
    #: Any attack fit on all the held-out rows and judged at its best threshold on those same rows: what
    #: an attacker could not beat on these rows (the HTTP audit landed between the two in 3 of 4 runs).
    upper_bound: float = 1.0
    auc: float
    label_only_floor: float | None  # 0.5 + (train − test)/2 on all the user's rows; None without labels
    mean_l1: float
    label_loss: float


class DatasetRecord(BaseModel):
    """The dataset a bundle's model was trained on, so an audit can reload it and check it is the same."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    loader: str  # the dataset registry's name for its format (``tabular`` for a user's mine.npz)
    data_path: str | None = None  # where its files were (None: bundled with the package)
    sha256: str
    rows: int = Field(ge=1)
    width: int = Field(ge=1)
    binary: bool = False
    image_shape: tuple[int, int, int] | None = None


class SplitRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    seed: int | None
    sizes: dict[str, int]
    file: str = "split.npz"  # role -> row indices, in the bundle


class AccuracyRecord(BaseModel):
    """Accuracy on the target's members (train) and on non-members (test); None without labels."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    train: float | None = None
    test: float | None = None
    plain: AccuracyRecord | None = None  # with a replacement: the plain target's, for comparison
    #: the split role ``test`` is measured on, also the defenders' non-members: ``validation`` when the served
    #: model trained on the reference set ``target_test`` (SELENA ``distill_on=both``)
    test_role: str = "target_test"


class TrainingRecord(BaseModel):
    """Provenance from the offline job: what was trained, on what, how, and how well.

    Written by ``defense_models`` (``train`` for a dataset, ``export`` for a user's ONNX model) and read by
    its audit; the gateway only carries it. A field renamed without a new ``schema_version`` fails here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: Literal[1] = 1
    source: Literal["dataset", "user-onnx", "torch-model"]  # train, export, or write_bundle directly
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved command configuration
    architecture: str | None = None  # the target's (source "dataset")
    fit: dict[str, Any] | None = None  # the target's fit recipe, as ``FitConfig`` fields
    replacement: dict[str, Any] = Field(default_factory=lambda: {"kind": "none"})  # kind + its record
    dataset: DatasetRecord | None = None
    split: SplitRecord | None = None
    rows: dict[str, int] = Field(default_factory=dict)  # source "user-onnx": members, nonmembers
    accuracy: AccuracyRecord = Field(default_factory=AccuracyRecord)
    defenders: dict[str, Any] = Field(default_factory=dict)  # the defender's step: recipes, rows, calibration
    seconds: dict[str, float] = Field(default_factory=dict)
    onnx_parity_max_abs_diff: float | None = None
    versions: dict[str, str] = Field(default_factory=dict)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(min_length=1)
    created: str = ""
    model_file: str = "model.onnx"
    input: TensorSpec
    output: OutputSpec
    files: dict[str, str] = Field(description="relative path -> sha256 hex of every file in the bundle")
    defenses: dict[str, DefenseEntry] = Field(default_factory=dict)
    #: Provenance from the offline job: resolved config, seeds, splits, accuracies, versions.
    training: TrainingRecord | None = None
    #: The offline job's attacks on held-out defender's rows, per shipped defense (and ``none``).
    self_audit: list[SelfAuditRow] = Field(default_factory=list)


class Bundle(BaseModel):
    model_config = ConfigDict(frozen=True)
    root: Path
    manifest: Manifest

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def model_path(self) -> Path:
        return self.path(self.manifest.model_file)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_bundle(root: Path) -> Bundle:
    """Read and verify a bundle; raise ``BundleError`` with the fix on any problem."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(
            f"{manifest_path} not found: point GATEWAY_ARTIFACTS at a bundle directory or {_REBUILD_HINT}"
        )
    try:
        raw = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not a valid manifest (not JSON: {exc}); {_REBUILD_HINT}") from exc
    found = raw.get("format_version") if isinstance(raw, dict) else None
    if found != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format_version {found}, this gateway reads {FORMAT_VERSION}; {_REBUILD_HINT}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{manifest_path} is not a valid manifest ({exc}); {_REBUILD_HINT}") from exc
    listed = set(manifest.files)
    needed = {manifest.model_file} | {d.weights for d in manifest.defenses.values() if d.weights}
    if unlisted := sorted(needed - listed):
        raise BundleError(f"{manifest_path} uses files without a sha256 entry: {unlisted}; {_REBUILD_HINT}")
    for rel, expected in sorted(manifest.files.items()):
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"{manifest_path} lists {rel!r}, which is outside the bundle; {_REBUILD_HINT}")
        if not path.is_file():
            raise BundleError(f"{rel} is listed in {manifest_path} but missing from {root}; {_REBUILD_HINT}")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"sha256 of {rel} does not match the manifest (expected {expected[:12]}…, found {actual[:12]}…): "
                f"the bundle was modified or copied incompletely; {_REBUILD_HINT}"
            )
    return Bundle(root=root, manifest=manifest)


def write_manifest(root: Path, manifest: Manifest) -> None:
    (Path(root) / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
