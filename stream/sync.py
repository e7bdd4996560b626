"""Model sync: merging the global parameters that tasks learn apart.

When P tasks each learn from their own partitions (each task a full set of
learners), parameters that are global by nature drift apart: a linear model's
weights and intercept see only a Pth of the stream in each task. ``ModelSync``
merges them every so often, the way Monolith and Flink ML merge parameter
updates: each task contributes its *delta*, its parameters minus those of the
last sync, and every task continues from

* ``"sum"``: the last merged parameters plus the sum of the deltas, what
  sequential SGD over everybody's updates does to first order (updates of
  disjoint data add up);
* ``"average"``: plus their mean (federated averaging: steadier, slower).

What is merged: the weights and intercept of River's linear models
(``LinearRegression``, ``LogisticRegression``, also inside a pipeline or an
``stream.drift.AdaptiveModel``). What is not: scaler statistics, optimizer
state, factorization machines' latent vectors, trees; they stay per task and
converge on their own when the partitions are alike (keys spread by hash).

>>> from river import linear_model
>>> a, b = linear_model.LinearRegression(), linear_model.LinearRegression()
>>> sync = ModelSync([a, b], mode="sum")
>>> a.learn_one({"x": 1.0}, 2.0); b.learn_one({"y": 1.0}, 2.0)
>>> sync.merge()
>>> round(a.weights["x"], 4) == round(b.weights["x"], 4) and round(a.weights["y"], 4) == round(b.weights["y"], 4)
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

from river import compose, linear_model

__all__ = ["ModelSync", "linear_parts"]

_LINEAR = (linear_model.LinearRegression, linear_model.LogisticRegression)


def linear_parts(model: Any) -> Iterator[Any]:
    """The linear models inside ``model``: itself, a pipeline's steps, an adaptive model's current one."""
    if isinstance(model, compose.Pipeline):  # first: a pipeline passes isinstance for its last step's class
        for step in model.steps.values():
            yield from linear_parts(step)
    elif isinstance(model, _LINEAR):
        yield model
    elif hasattr(model, "current"):  # stream.drift.AdaptiveModel: the model that serves
        yield from linear_parts(model.current)


def _params(model: Any) -> dict[tuple[int, str], float]:
    out: dict[tuple[int, str], float] = {}
    for i, part in enumerate(linear_parts(model)):
        for feature, w in part._weights.items():
            out[(i, feature)] = float(w)
        out[(i, "")] = float(part.intercept)  # features are never "": the intercept's slot
    return out


def _assign(model: Any, params: dict[tuple[int, str], float]) -> None:
    for i, part in enumerate(linear_parts(model)):
        weights = part._weights
        for (j, feature), value in params.items():
            if j != i:
                continue
            if feature == "":
                part.intercept = value
            else:
                weights[feature] = value


class ModelSync:
    """Delta merging of the linear parameters of one learner's models across tasks (see the module doc)."""

    def __init__(self, models: Sequence[Any], mode: Literal["sum", "average"] = "sum") -> None:
        self.models = list(models)
        self.mode = mode
        self.merges = 0
        #: The parameters every task started from at the last merge (no merge yet: the first model's,
        #: which every task shares when they are built alike).
        self._base = _params(self.models[0]) if self.models else {}

    def merge(self) -> None:
        snaps = [_params(m) for m in self.models]
        base = self._base
        keys = set(base).union(*snaps)
        scale = 1.0 if self.mode == "sum" else 1.0 / max(len(snaps), 1)
        merged: dict[tuple[int, str], float] = {}
        for k in keys:
            b = base.get(k, 0.0)
            merged[k] = b + scale * sum(s.get(k, b) - b for s in snaps)
        for m in self.models:
            _assign(m, merged)
        self._base = merged
        self.merges += 1
