"""Quality gates and the self-audit: does a freshly trained defense protect anything?

Both run on defender's rows held out from the classifiers' training (``Rows``), through the same
release path as the gateway (``gateway.pipeline.release_vectors``):

* ``measure`` (per defense): the classifier's balanced accuracy, MemGuard's Phase I success rate,
  the share of rows the served defense perturbs at its configured parameters, in particular among
  the rows the classifier calls members ("flagged"), mean L1 and label loss. ``problems`` names what
  makes a defense a no-op or close to one; ``train`` and ``export`` refuse such a bundle unless told
  ``--allow-weak-defense`` (recorded in the manifest).
* ``self_audit``: the best confidence-based attack against each shipped defense (and against the
  undefended model), learning its threshold on one half of the rows and scored on the other, then
  the other way round; next to the label-only floor, mean L1 and label loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from defense_models.audit.attacks import AttackData, create_attack
from defense_models.audit.scoring import accuracy, balanced_accuracy_at, gap_floor, label_loss, score_attack
from gateway.artifacts import DefenseQuality, SelfAuditRow
from gateway.defenses import Defense
from gateway.defenses.aeppt import Aeppt
from gateway.defenses.memguard import MemGuard
from gateway.defenses.simplex import logits_from_probs
from gateway.pipeline import release_vectors

#: The classifier must tell held-out members from non-members at least this well to be worth serving.
MIN_BALANCED_ACCURACY = 0.55
#: ... and the served defense must perturb at least this share of the rows it calls members.
MIN_PERTURBED_FLAGGED = 0.5
#: A row counts as perturbed when the defense moved it by at least this much in L1: a defense that
#: moves rows by 1e-9 satisfies its classifier and changes nothing an attacker sees.
MIN_L1_PERTURBED = 1e-3
#: The self-audit's attacks: those that read confidence values and learn from a few hundred rows.
SELF_AUDIT_ATTACKS = ("confidence", "entropy", "modified_entropy", "nn_sorted")
_SECRET = b"defense_models quality gate"


class WeakDefenseError(ValueError):
    """A defense the quality gate refuses; the message says what to do."""


@dataclass(frozen=True)
class Rows:
    """Held-out defender's rows: clean probabilities [N, C] float64 and labels [N] (true, or argmax)."""

    p_in: np.ndarray
    y_in: np.ndarray
    p_out: np.ndarray
    y_out: np.ndarray
    true_labels: bool  # whether y_* are the records' labels (else the floor is unknown)

    @classmethod
    def of(cls, o: Any, rows_in: Any = slice(None), rows_out: Any = slice(None)) -> Rows:
        """Selected rows of a ``defender_step.TargetOutputs`` (tensors) as NumPy arrays."""
        return cls(o.p_in[rows_in].double().numpy(), o.y_in[rows_in].numpy(), o.p_out[rows_out].double().numpy(),
                   o.y_out[rows_out].numpy(), o.true_labels)  # fmt: skip


def _flags(defense: Defense, clean: np.ndarray, released: np.ndarray | None = None) -> np.ndarray:
    """[N] bool: rows the defense's classifier calls members on ``released`` (default: the clean rows).

    MemGuard's g reads the sorted vector; AEPPT's substitute reads the vector and the clean label.
    """
    p = torch.from_numpy(clean if released is None else released)  # [N, C]
    with torch.no_grad():
        if isinstance(defense, MemGuard):
            return (defense.g.logit(torch.sort(p, dim=1).values.to(defense.dtype)) > 0).numpy()
        if isinstance(defense, Aeppt):
            t = torch.nn.functional.one_hot(torch.from_numpy(clean).argmax(1), p.shape[1]).to(defense.dtype)
            return (defense.substitute_logit(p.to(defense.dtype), t) > 0).numpy()
    raise TypeError(f"no quality gate for defense {defense.name!r}")


def _flag_accuracy(flags: np.ndarray, n_in: int) -> float:
    """Balanced accuracy of member flags [N] whose first ``n_in`` rows are members."""
    return balanced_accuracy_at(flags[:n_in], flags[n_in:], 0.5)


def _phase_one_success(defense: MemGuard, probs: np.ndarray) -> float:
    p = torch.from_numpy(probs)
    phase = defense.phase_one(logits_from_probs(p).float(), p.argmax(1))
    needed = (torch.sigmoid(phase.h0.double()) - 0.5).abs() > 1e-5  # rows Phase I had to move
    return float(phase.has_noise[needed].double().mean()) if needed.any() else 1.0


def measure(defense: Defense, rows: Rows) -> DefenseQuality:
    """The quality gate's measurements for one served defense (MemGuard or AEPPT) on held-out rows."""
    clean = np.concatenate([rows.p_in, rows.p_out])
    released = release_vectors(defense, clean, secret=_SECRET)
    perturbed = np.abs(released - clean).sum(axis=1) >= MIN_L1_PERTURBED
    flagged = _flags(defense, clean)
    n_in = len(rows.p_in)
    quality: dict[str, Any] = {
        "held_out_members": n_in,
        "held_out_nonmembers": len(rows.p_out),
        "classifier_balanced_accuracy": round(_flag_accuracy(flagged, n_in), 4),
        "flagged_share": round(float(flagged.mean()), 4),
        "perturbed_share": round(float(perturbed.mean()), 4),
        "perturbed_share_flagged": round(float(perturbed[flagged].mean()), 4) if flagged.any() else None,
        "mean_l1": round(float(np.abs(released - clean).sum(1).mean()), 5),
        "label_loss": label_loss(released, clean),
        "params": defense.params(),
    }
    if isinstance(defense, MemGuard):
        quality["phase_one_success"] = round(_phase_one_success(defense, clean), 4)
    else:
        after = _flag_accuracy(_flags(defense, clean, released), n_in)
        quality["classifier_balanced_accuracy_defended"] = round(after, 4)
    return DefenseQuality(**quality, problems=problems(defense.name, DefenseQuality(**quality)))


def problems(name: str, q: DefenseQuality) -> list[str]:
    """Why the gate refuses the defense (empty: it passes)."""
    out = []
    if q.classifier_balanced_accuracy < MIN_BALANCED_ACCURACY:
        out.append(
            f"{name}'s classifier tells held-out members from non-members no better than chance (balanced accuracy "
            f"{q.classifier_balanced_accuracy:.3f} < {MIN_BALANCED_ACCURACY}): give it more non-member rows, or the "
            "target's outputs may not leak membership at all (then serve it with defense none)"
        )
    if q.perturbed_share_flagged is None or q.perturbed_share_flagged < MIN_PERTURBED_FLAGGED:
        share = "no row is" if q.perturbed_share_flagged is None else f"only {q.perturbed_share_flagged:.0%} of the"
        out.append(
            f"{name} would be close to a no-op: {share} held-out rows its classifier calls members "
            f"{'flagged' if q.perturbed_share_flagged is None else 'are perturbed'} (at least "
            f"{MIN_PERTURBED_FLAGGED:.0%} needed); try more non-member rows, another --defender-recipe, or a larger "
            "budget"
        )
    return out


def enforce(qualities: dict[str, DefenseQuality], allow_weak: bool) -> dict[str, DefenseQuality]:
    """Raise ``WeakDefenseError`` for failed gates, or mark them overridden when ``allow_weak``."""
    failed = {name: q for name, q in qualities.items() if q.problems}
    if failed and not allow_weak:
        lines = [f"  {name}: {p}" for name, q in failed.items() for p in q.problems]
        raise WeakDefenseError(
            "the quality gate refuses this bundle:\n" + "\n".join(lines) + "\nPass --allow-weak-defense to write it "
            "anyway (recorded in the manifest, and the gateway warns at startup), or --defense none to ship "
            "no output defense."
        )
    return {name: q.model_copy(update={"override": bool(q.problems)}) for name, q in qualities.items()}


# --- the self-audit ---------------------------------------------------------------------------------
def _halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: n // 2]] = True
    return mask, ~mask


def _in_sample(name: str, members: AttackData, nonmembers: AttackData) -> float:
    """The attack fit on all the rows and judged at the best threshold on those same rows: an upper bound."""
    attack = create_attack(name)
    attack.fit(members, nonmembers)
    return score_attack(attack.score(members), attack.score(nonmembers)).oracle_balanced_accuracy


def _best_attack(p_in: np.ndarray, y_in: np.ndarray, p_out: np.ndarray, y_out: np.ndarray,
                 seed: int) -> tuple[str, float, float, float]:  # fmt: skip
    """(name, balanced accuracy, AUC) of the best attack, two-fold: fit on one half, score the other; and the
    best in-sample balanced accuracy of any attack (an upper bound)."""
    rng = np.random.default_rng(seed)
    a_in, b_in = _halves(len(y_in), rng)
    a_out, b_out = _halves(len(y_out), rng)
    best = ("none", 0.0, 0.5)
    upper = max(_in_sample(n, AttackData(p_in, y_in), AttackData(p_out, y_out)) for n in SELF_AUDIT_ATTACKS)
    for name in SELF_AUDIT_ATTACKS:
        accs, aucs = [], []
        for (fi, fo), (si, so) in (((a_in, a_out), (b_in, b_out)), ((b_in, b_out), (a_in, a_out))):
            attack = create_attack(name)
            train = AttackData(p_in[fi], y_in[fi]), AttackData(p_out[fo], y_out[fo])
            attack.fit(*train)
            calib = attack.score(train[0]), attack.score(train[1])
            s = score_attack(attack.score(AttackData(p_in[si], y_in[si])),
                             attack.score(AttackData(p_out[so], y_out[so])), shadow=calib)  # fmt: skip
            accs.append(s.balanced_accuracy)
            aucs.append(s.auc)
        if np.mean(accs) > best[1]:
            best = (name, float(np.mean(accs)), float(np.mean(aucs)))
    return (*best, max(upper, best[1]))


def self_audit(
    rows: Rows, defenses: dict[str, Defense], seed: int = 0, floor_rows: Rows | None = None
) -> list[SelfAuditRow]:
    """The best confidence-based attack without a defense and against each of ``defenses``.

    The label-only floor needs no defense, so it is measured on ``floor_rows`` when given: every row the
    user brought, not only the held-out ones (with 125 held-out non-members, the floor alone varied by
    ±5 points between hold-out seeds).
    """
    f = floor_rows or rows
    floor = gap_floor(accuracy(f.p_in, f.y_in), accuracy(f.p_out, f.y_out)) if rows.true_labels else None
    clean = np.concatenate([rows.p_in, rows.p_out])
    n_in = len(rows.p_in)
    out = []
    for name, defense in {"none": None, **defenses}.items():
        released = clean if defense is None else release_vectors(defense, clean, secret=_SECRET + b" audit")
        attack, acc, area, upper = _best_attack(released[:n_in], rows.y_in, released[n_in:], rows.y_out, seed)
        out.append(SelfAuditRow(
            defense=name, best_attack=attack, balanced_accuracy=round(acc, 4), upper_bound=round(upper, 4),
            auc=round(area, 4),
            label_only_floor=None if floor is None else round(floor, 4),
            mean_l1=round(float(np.abs(released - clean).sum(1).mean()), 5), label_loss=label_loss(released, clean),
        ))  # fmt: skip
    return out


def format_self_audit(rows: list[SelfAuditRow]) -> str:
    """The self-audit as a small table for the summary printed at the end of ``train``/``export``."""
    lines = ["  defense        best confidence attack      bal. acc (upper)   AUC     floor   mean L1   label loss"]
    for r in rows:
        floor = "   —  " if r.label_only_floor is None else f"{r.label_only_floor:.3f}"
        lines.append(f"  {r.defense:<14} {r.best_attack:<27} {r.balanced_accuracy:.3f} ({r.upper_bound:.3f})    "
                     f"{r.auc:.3f}   {floor}   {r.mean_l1:.4f}    {r.label_loss:.3f}")  # fmt: skip
    return "\n".join(lines)
