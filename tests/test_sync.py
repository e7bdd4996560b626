"""Model sync (``stream.sync.ModelSync``): delta merging of linear parameters across task models."""

from __future__ import annotations

import pytest
from river import linear_model, optim, preprocessing

from stream.drift import AdaptiveModel
from stream.sync import ModelSync, linear_parts


def lr() -> linear_model.LinearRegression:
    return linear_model.LinearRegression(optimizer=optim.SGD(0.1), intercept_lr=0.1)


def test_sum_adds_the_tasks_updates_and_average_takes_their_mean() -> None:
    for mode, factor in (("sum", 1.0), ("average", 0.5)):
        a, b = lr(), lr()
        sync = ModelSync([a, b], mode=mode)  # type: ignore[arg-type]
        a.learn_one({"x": 1.0}, 1.0)
        b.learn_one({"x": 1.0}, 1.0)
        alone = lr()
        alone.learn_one({"x": 1.0}, 1.0)  # each task's own update, from the same start
        sync.merge()
        for m in (a, b):
            assert m.weights["x"] == pytest.approx(2 * factor * alone.weights["x"])
            assert m.intercept == pytest.approx(2 * factor * alone.intercept)


def test_features_seen_by_one_task_reach_every_task_and_later_merges_take_only_new_updates() -> None:
    a, b, c = lr(), lr(), lr()
    sync = ModelSync([a, b, c])
    a.learn_one({"only_a": 1.0}, 3.0)
    sync.merge()
    assert b.weights["only_a"] == a.weights["only_a"] == c.weights["only_a"] != 0
    before = a.weights["only_a"]
    sync.merge()  # nothing learned since: nothing changes
    assert a.weights["only_a"] == before and sync.merges == 2


def test_pipelines_and_adaptive_models_merge_their_linear_part() -> None:
    p1 = preprocessing.StandardScaler() | lr()
    p2 = preprocessing.StandardScaler() | lr()
    assert [type(m).__name__ for m in linear_parts(p1)] == ["LinearRegression"]
    sync = ModelSync([p1, p2])
    p1.learn_one({"x": 2.0}, 1.0)
    p2.learn_one({"x": 4.0}, 2.0)
    sync.merge()
    assert p1["LinearRegression"].weights == p2["LinearRegression"].weights
    assert p1["LinearRegression"].intercept == p2["LinearRegression"].intercept != 0
    adaptive = AdaptiveModel(lr(), task="regression")
    assert list(linear_parts(adaptive)) == [adaptive.current]
