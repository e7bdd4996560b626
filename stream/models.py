"""Build River models from configuration, without ever evaluating a string.

A model is given as a River class path relative to the ``river`` package and
its parameters. Parameters may themselves be model specs (an optimizer, a
loss, a sub-model), and a list of specs is composed into a pipeline.

>>> model = build_model([
...     {"class": "preprocessing.StandardScaler"},
...     {"class": "linear_model.LogisticRegression", "params": {"l2": 0.001,
...         "optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}}}},
... ])
>>> type(model).__name__, [type(s).__name__ for s in model.steps.values()]
('Pipeline', ['StandardScaler', 'LogisticRegression'])
>>> build_model({"class": "linear_model.LogisticRegresion"})
Traceback (most recent call last):
...
stream.errors.ModelSpecError: model.class: `linear_model.LogisticRegresion` is not a River class ...
>>> build_model({"class": "linear_model.LogisticRegression", "params": {"alpha": 1}})
Traceback (most recent call last):
...
stream.errors.ModelSpecError: model.params.alpha: LogisticRegression has no parameter `alpha` (it has: ...)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from functools import cache
from typing import Any, cast

import river
from river import base, compose

from stream.errors import ModelSpecError

__all__ = ["ModelSpecError", "build_model", "with_seed"]

_PATH = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*\.[A-Z][A-Za-z0-9_]*$")


@cache
def _river_modules() -> frozenset[str]:
    return frozenset(m.name for m in pkgutil.iter_modules(river.__path__) if not m.name.startswith("_"))


def _resolve_class(path: str, where: str) -> type:
    if not _PATH.match(path):
        raise ModelSpecError(f"{where}: `{path}` is not a River class path like `linear_model.LogisticRegression`")
    module_path, _, name = path.rpartition(".")
    top = module_path.split(".", 1)[0]
    if top not in _river_modules():
        raise ModelSpecError(f"{where}: `{path}` is not a River class (no module river.{top})")
    try:
        module = importlib.import_module(f"river.{module_path}")
    except ImportError:
        raise ModelSpecError(f"{where}: `{path}` is not a River class (no module river.{module_path})") from None
    cls = getattr(module, name, None)
    if not inspect.isclass(cls) or not cls.__module__.startswith("river."):
        raise ModelSpecError(f"{where}: `{path}` is not a River class (river.{module_path} has no `{name}`)")
    return cls


def _is_spec(value: Any) -> bool:
    return isinstance(value, dict) and "class" in value


def _build_value(value: Any, where: str) -> Any:
    if _is_spec(value):
        return _build_one(value, where)
    if isinstance(value, list) and value and all(_is_spec(v) for v in value):
        return build_model(value, where)
    return value


def _build_one(spec: dict[str, Any], where: str) -> Any:
    unknown = set(spec) - {"class", "params"}
    if unknown:
        raise ModelSpecError(f"{where}: unknown key(s) {sorted(unknown)}; a model spec has `class` and `params`")
    cls = _resolve_class(spec["class"], f"{where}.class")
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ModelSpecError(f"{where}.params: expected a table of parameters, got {type(params).__name__}")
    accepted = [p for p in inspect.signature(cls).parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = [p.name for p in accepted]
    for key in params:
        if key not in names:
            raise ModelSpecError(
                f"{where}.params.{key}: {cls.__name__} has no parameter `{key}` (it has: {', '.join(names)})"
            )
    kwargs = {k: _build_value(v, f"{where}.params.{k}") for k, v in params.items()}
    try:
        return cls(**kwargs)
    except Exception as exc:  # River raises assorted types on bad values
        raise ModelSpecError(f"{where}: {cls.__name__}({kwargs}) failed: {exc}") from None


def build_model(spec: dict[str, Any] | list[dict[str, Any]], where: str = "model") -> base.Estimator:
    """Build one River estimator, or a ``compose.Pipeline`` from a list of specs."""
    if isinstance(spec, list):
        if not spec:
            raise ModelSpecError(f"{where}: an empty pipeline")
        steps = [_build_one(s, f"{where}[{i}]") for i, s in enumerate(spec)]
        return steps[0] if len(steps) == 1 else compose.Pipeline(*steps)
    if not isinstance(spec, dict):
        raise ModelSpecError(f"{where}: expected a table with `class`, or a list of them")
    model = _build_one(spec, where)
    if not isinstance(model, base.Base):
        raise ModelSpecError(f"{where}: `{spec['class']}` is not a River estimator")
    return cast(base.Estimator, model)


def _accepts_seed(path: Any) -> bool:
    try:
        return "seed" in inspect.signature(_resolve_class(path, "model")).parameters
    except (ModelSpecError, TypeError, ValueError):
        return False  # build_model reports a bad class


def with_seed(spec: Any, seed: int) -> Any:
    """``spec`` with ``seed`` given to every (nested) model that takes one and has
    none, so models are reproducible without repeating the seed in config.

    >>> with_seed({"class": "forest.ARFClassifier"}, 7)
    {'class': 'forest.ARFClassifier', 'params': {'seed': 7}}
    >>> with_seed([{"class": "preprocessing.StandardScaler"}], 7)
    [{'class': 'preprocessing.StandardScaler', 'params': {}}]
    """
    if isinstance(spec, list):
        return [with_seed(s, seed) for s in spec]
    if not isinstance(spec, dict) or "class" not in spec:
        return spec
    params = spec.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return spec  # build_model reports it
    params = {k: with_seed(v, seed) for k, v in params.items()}
    if "seed" not in params and _accepts_seed(spec["class"]):
        params["seed"] = seed
    return {**spec, "params": params}
