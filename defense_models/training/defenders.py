"""The defender's classifiers: MemGuard's g and AEPPT's substitute, trained on target outputs.

Both learn members (the target's training rows, label 1) against non-members the defender holds
(label 0) from the target's confidence vectors only, so they work for any target, including a
user-supplied ONNX model.

A *recipe* (``DEFENDER_RECIPES``) says how. The published recipes (``official``) train on raw
probabilities with plain BCE; on a user's model they can learn nothing at all: with 1,500 member
and 500 non-member rows, and members whose top probability is 0.999+, g converged to the constant
"member" (training accuracy 0.75 = the majority rate) and MemGuard then perturbed no row. The
``robust`` recipe (the default) fixes the causes, and leaves the served architectures as they are:

* **balanced** BCE (positives weighted by n_out / n_in), whatever the member/non-member ratio;
* **standardized inputs**: every probability feature is centred and scaled on the training rows
  (small tail probabilities become separable), and the affine map is folded into the first layer
  afterwards, so the bundle holds an ordinary g (and substitute) on raw probabilities;
* **Adam with weight decay** (g: 1e-2; the substitute: 1e-3, as it collapses to a constant at 1e-2)
  and, for g, **monotone augmentation** (``DefenderRecipe.sharpen``): without them g fits a narrow
  band of confidence and is not monotone beyond it, so MemGuard's Phase I (gradient steps on g)
  stalls on saturated members beyond that band and fails. Weight decay alone: Phase I success 57–87%
  on held-out rows; with the augmentation: 100%, in about 20 steps.

``docs/ALGORITHMS.md`` records the measurements behind each choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from defense_models.training.loop import FitConfig, fit
from gateway.defenses.classifier import AepptSubstitute, MemGuardClassifier
from gateway.defenses.simplex import logits_from_probs

#: MemGuard's recipe [code train_defense_model_defensemodel.py]: BCE, SGD lr 0.001, batch 64, 400 epochs.
MEMGUARD_FIT = FitConfig(epochs=400, batch_size=64, lr=0.001, optimizer="sgd")
#: AEPPT [paper §5.2]: lr 0.001, 100 epochs; optimizer and batch size unstated [choice: Adam, 128].
SUBSTITUTE_FIT = FitConfig(epochs=100, batch_size=128, lr=0.001, optimizer="adam")


@dataclass(frozen=True)
class DefenderRecipe:
    """How one defender's classifier learns members from non-members."""

    fit: FitConfig
    #: Weight the classes equally whatever the member/non-member ratio.
    balanced: bool = True
    #: Train on standardized probabilities, then fold the affine map into the first layer.
    standardize: bool = True
    #: Monotone augmentation: add every member sharpened (logits / T) and every non-member flattened
    #: (logits · T) for each T here, with their own labels. Teaches g that a more confident version
    #: of a member's vector is no less a member, so Phase I's descent cannot stall in a pocket of
    #: low h beyond the members' confidence (measured: Phase I success 57–87% → 100%).
    sharpen: tuple[float, ...] = ()
    #: g only: > 0 makes g read log(s + log_floor) (``MemGuardClassifier.log_floor``), so tail
    #: probabilities of 1e-7 and 1e-4 are as far apart as 0.1 and 0.0001. 0: raw probabilities.
    log_floor: float = 0.0


@dataclass(frozen=True)
class DefenderRecipes:
    g: DefenderRecipe
    substitute: DefenderRecipe


#: g: weight decay 1e-2 keeps it smooth enough for Phase I's gradient steps. The substitute collapses
#: to a constant at 1e-2 (every ReLU dies); 1e-3 keeps it separating.
_ROBUST_G = FitConfig(epochs=70, batch_size=64, lr=1e-3, optimizer="adam", weight_decay=1e-2)  # on 3× rows
_SHARPEN = (0.5, 0.25)
_LOG_FLOOR = 1e-10
_ROBUST_SUBSTITUTE = FitConfig(epochs=100, batch_size=128, lr=1e-3, optimizer="adam", weight_decay=1e-3)
#: Recipe name -> (g, substitute). ``robust`` is the default for ``train`` and ``export``; ``quick``
#: serves ``--preset demo``; ``official`` reproduces the papers' defender training.
DEFENDER_RECIPES: dict[str, DefenderRecipes] = {
    "robust": DefenderRecipes(DefenderRecipe(_ROBUST_G, sharpen=_SHARPEN), DefenderRecipe(_ROBUST_SUBSTITUTE)),
    "quick": DefenderRecipes(
        DefenderRecipe(replace(_ROBUST_G, epochs=25), sharpen=_SHARPEN),
        DefenderRecipe(replace(_ROBUST_SUBSTITUTE, epochs=40)),
    ),
    #: For targets so saturated that ``robust``'s g cannot separate (the gate says so): g reads
    #: log(s + 1e-10). It resolves tails of 1e-7 vs 1e-4, but it also lets MemGuard satisfy g with tail
    #: changes attackers hardly see (Location30 user model: best attack 0.02–0.06 higher than robust's).
    "saturated": DefenderRecipes(
        DefenderRecipe(_ROBUST_G, sharpen=_SHARPEN, log_floor=_LOG_FLOOR), DefenderRecipe(_ROBUST_SUBSTITUTE)
    ),
    "official": DefenderRecipes(
        DefenderRecipe(MEMGUARD_FIT, balanced=False, standardize=False),
        DefenderRecipe(SUBSTITUTE_FIT, balanced=False, standardize=False),
    ),
}


def _binary(members: torch.Tensor, nonmembers: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))])


def _loss(recipe: DefenderRecipe, n_in: int, n_out: int) -> nn.Module:
    if not recipe.balanced:
        return nn.BCEWithLogitsLoss()
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_out / max(n_in, 1)))


def _moments(X: torch.Tensor, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature (mean [C], scale [C]) of X [N, C]; (0, 1) when not standardizing."""
    if not standardize:
        return torch.zeros(X.shape[1]), torch.ones(X.shape[1])
    return X.mean(0), X.std(0).clamp_min(1e-8)


@torch.no_grad()
def fold_standardization(layer: nn.Linear, mean: torch.Tensor, scale: torch.Tensor) -> None:
    """Make ``layer(x)`` compute what it computed on (x − mean)/scale: W' = W/scale, b' = b − W'·mean."""
    layer.weight.div_(scale[None, :])  # [out, C]
    layer.bias.sub_(layer.weight @ mean)


class _Standardized(nn.Module):
    """Feeds a model (x − mean)/scale in its first argument while it trains."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, inner: nn.Module, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.scale, *rest)


def _tempered(probs: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """probs [N, C] followed by softmax(log probs / T) for each T: [N·(1 + len(T)), C]."""
    logp = logits_from_probs(probs.double())
    return torch.cat([probs.double(), *(torch.softmax(logp / t, dim=1) for t in temperatures)])


def train_memguard_classifier(
    member_probs: torch.Tensor,
    nonmember_probs: torch.Tensor,
    recipe: DefenderRecipe = DEFENDER_RECIPES["robust"].g,
    *,
    progress: bool = False,
) -> MemGuardClassifier:
    """probs [N, C] of members and non-members -> g, a classifier of sorted vectors (logit > 0: member)."""
    member_probs = _tempered(member_probs, recipe.sharpen)
    nonmember_probs = _tempered(nonmember_probs, tuple(1 / t for t in recipe.sharpen))
    X = torch.sort(torch.cat([member_probs, nonmember_probs]).float(), dim=1).values  # [N, C] ascending
    y = _binary(member_probs, nonmember_probs)
    torch.manual_seed(recipe.fit.seed)
    g = MemGuardClassifier(X.shape[1], log_floor=recipe.log_floor)
    X = g.features(X)  # [N, C] what the first layer reads; g trains on it with its features switched off
    g.log_floor.zero_()
    mean, scale = _moments(X, recipe.standardize)
    fit(_Standardized(g, mean, scale), X, y, recipe.fit, loss_fn=_loss(recipe, len(member_probs), len(nonmember_probs)),
        progress=progress, desc="memguard g")  # fmt: skip
    first = g.layers[0]
    assert isinstance(first, nn.Linear)
    fold_standardization(first, mean, scale)
    g.log_floor.fill_(recipe.log_floor)
    return g.eval()


def train_substitute(
    member_probs: torch.Tensor,
    member_labels: torch.Tensor,
    nonmember_probs: torch.Tensor,
    nonmember_labels: torch.Tensor,
    recipe: DefenderRecipe = DEFENDER_RECIPES["robust"].substitute,
    *,
    progress: bool = False,
) -> AepptSubstitute:
    """The substitute F(v, t), with t the one-hot label given (true or argmax, the caller's choice)."""
    C = member_probs.shape[1]
    v = torch.cat([member_probs, nonmember_probs]).float()  # [N, C]
    t = nn.functional.one_hot(torch.cat([member_labels, nonmember_labels]), C).float()  # [N, C]
    y = _binary(member_probs, nonmember_probs)
    torch.manual_seed(recipe.fit.seed)
    sub = AepptSubstitute(C)
    mean, scale = _moments(v, recipe.standardize)
    fit(_Standardized(sub, mean, scale), (v, t), y, recipe.fit,
        loss_fn=_loss(recipe, len(member_probs), len(nonmember_probs)), progress=progress,
        desc="aeppt substitute")  # fmt: skip
    fold_standardization(sub.pred, mean, scale)
    return sub.eval()


def holdout(n_members: int, n_nonmembers: int, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded (train_in, held_in, train_out, held_out) index arrays: ``fraction`` of each class held out."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_members, n_nonmembers):
        perm = rng.permutation(n)
        k = round(fraction * n) if fraction > 0 else 0
        out += [np.sort(perm[k:]), np.sort(perm[:k])]
    return tuple(out)
