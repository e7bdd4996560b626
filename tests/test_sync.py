"""Model sync (``stream.sync``): Params, the Merger's families and modes, the River and learner seams."""

from __future__ import annotations

import math

import numpy as np
import pytest
from river import linear_model, optim, preprocessing

from stream.config import build_learners, load_config
from stream.drift import AdaptiveModel
from stream.sync import Merger, Params, Table, assign_model_params, linear_parts, model_params, scaler_parts


def lr() -> linear_model.LinearRegression:
    return linear_model.LinearRegression(optimizer=optim.SGD(0.1), intercept_lr=0.1)


def sync_round(merger: Merger, models: dict[int, object]) -> Params:
    merged = merger.merge({t: model_params(m) for t, m in models.items()})
    for t, m in models.items():
        assign_model_params(m, merged)
        merger.applied(t, model_params(m))
    return merged


def test_sum_adds_the_tasks_updates_and_average_takes_their_mean() -> None:
    for mode, factor in (("sum", 1.0), ("average", 0.5)):
        a, b = lr(), lr()
        a.learn_one({"x": 1.0}, 1.0)
        b.learn_one({"x": 1.0}, 1.0)
        alone = lr()
        alone.learn_one({"x": 1.0}, 1.0)  # each task's own update, from the same start
        sync_round(Merger(mode), {0: a, 1: b})  # type: ignore[arg-type]
        for m in (a, b):
            assert m.weights["x"] == pytest.approx(2 * factor * alone.weights["x"])
            assert m.intercept == pytest.approx(2 * factor * alone.intercept)


def test_features_seen_by_one_task_reach_every_task_and_later_merges_take_only_new_updates() -> None:
    a, b, c = lr(), lr(), lr()
    merger = Merger()
    a.learn_one({"only_a": 1.0}, 3.0)
    sync_round(merger, {0: a, 1: b, 2: c})
    assert b.weights["only_a"] == a.weights["only_a"] == c.weights["only_a"] != 0
    before = a.weights["only_a"]
    sync_round(merger, {0: a, 1: b, 2: c})  # nothing learned since: nothing changes
    assert a.weights["only_a"] == before
    b.learn_one({"only_a": 1.0}, 3.0)
    step = b.weights["only_a"] - before
    sync_round(merger, {0: a, 1: b, 2: c})
    assert a.weights["only_a"] == pytest.approx(before + step)


def test_a_resent_contribution_replaces_the_older_one() -> None:
    merger = Merger()
    merger.replace(0, Params(counts={"c|n": 5.0}))
    merger.replace(0, Params(counts={"c|n": 7.0}))  # the same task again: newer, not more
    merger.replace(1, Params(counts={"c|n": 1.0}))
    assert merger.merged().counts == {"c|n": 8.0}


def test_fresh_zero_counts_a_new_task_and_own_or_read_back_adopts() -> None:
    held = Params(weights={"l0|x": 2.0}, counts={"c|n": 3.0})
    zero = Merger(fresh="zero")
    zero.update(0, held)
    assert zero.merged().counts == {"c|n": 3.0}
    own = Merger(fresh="own")
    own.update(0, held)
    assert own.merged().counts == {"c|n": 0.0}
    restored = Merger()
    restored.replace(0, Params(counts={"c|n": 10.0}))  # the task's contribution, read back from the topic
    restored.update(0, held)  # its restored state: already counted in that contribution
    assert restored.merged().counts == {"c|n": 10.0}


def test_counts_are_summed_even_in_average_mode_and_vectors_merge_like_numbers() -> None:
    merger = Merger("average")
    merger.update(0, Params(weights={"w": 1.0, "v": np.array([1.0, 3.0])}, counts={"n": 2.0}))
    merger.update(1, Params(weights={"w": 3.0, "v": np.array([3.0, 5.0])}, counts={"n": 4.0}))
    merged = merger.merged()
    assert merged.weights["w"] == 2.0 and merged.counts == {"n": 6.0}
    assert merged.weights["v"].tolist() == [2.0, 4.0]


def test_a_table_merges_row_by_row_like_one_key_per_id() -> None:
    rows = {"a": np.array([1.0, 2.0]), "b": np.array([0.5, 0.5]), "c": np.array([3.0, 1.0])}
    by_key, by_table = Merger(), Merger()
    parts = [("a", "b"), ("b", "c")]
    for task, ids in enumerate(parts):
        by_key.update(task, Params(weights={i: rows[i] * (task + 1) for i in ids}))
        by_table.update(task, Params(weights={"t": Table(list(ids), np.stack([rows[i] * (task + 1) for i in ids]))}))
    keyed, table = by_key.merged().weights, by_table.merged().weights["t"]
    assert isinstance(table, Table) and sorted(table.ids) == ["a", "b", "c"]
    for i, r in table.index().items():
        assert table.matrix[r].tolist() == keyed[i].tolist()  # type: ignore[union-attr]
    # A delta is taken row by row against what the task held: only what it learned since counts.
    held = Params(weights={"t": Table(["a", "b"], np.stack([rows["a"], rows["b"]]))})
    by_table.applied(0, held)
    by_table.update(0, Params(weights={"t": Table(["b", "a"], np.stack([rows["b"] + 1.0, rows["a"]]))}))
    merged = by_table.merged().weights["t"]
    assert merged.matrix[merged.index()["b"]].tolist() == (keyed["b"] + 1.0).tolist()  # type: ignore[union-attr]


def test_decayed_counts_are_brought_to_the_newest_reference() -> None:
    tau = 1000.0
    merger = Merger()
    merger.update(0, Params(decayed={"a": 1.0}, ref_ms=0.0, tau_ms=tau))
    merger.update(1, Params(decayed={"a": 1.0}, ref_ms=tau, tau_ms=tau))
    merged = merger.merged()
    assert merged.ref_ms == tau
    assert merged.decayed["a"] == pytest.approx(1.0 + math.exp(-1.0))


def test_pooled_scaler_moments_equal_one_scaler_over_everything() -> None:
    xs = [1.0, 4.0, 2.0, 8.0, 5.0, 7.0]
    parts = [preprocessing.StandardScaler(), preprocessing.StandardScaler()]
    for i, x in enumerate(xs):
        parts[i % 2].learn_one({"x": x})
    merged = Merger().merge({i: model_params(s) for i, s in enumerate(parts)})
    assign_model_params(parts[0], merged)
    assert parts[0].counts["x"] == len(xs)
    assert parts[0].means["x"] == pytest.approx(float(np.mean(xs)))
    assert parts[0].vars["x"] == pytest.approx(float(np.var(xs)))


def test_pipelines_and_adaptive_models_merge_their_linear_and_scaler_parts() -> None:
    p1 = preprocessing.StandardScaler() | lr()
    p2 = preprocessing.StandardScaler() | lr()
    assert [type(m).__name__ for m in linear_parts(p1)] == ["LinearRegression"]
    assert [type(m).__name__ for m in scaler_parts(p1)] == ["StandardScaler"]
    p1.learn_one({"x": 2.0}, 1.0)
    p2.learn_one({"x": 4.0}, 2.0)
    sync_round(Merger(), {0: p1, 1: p2})
    assert p1["LinearRegression"].weights == p2["LinearRegression"].weights
    assert p1["LinearRegression"].intercept == p2["LinearRegression"].intercept != 0
    assert p1["StandardScaler"].means["x"] == p2["StandardScaler"].means["x"] == 3.0
    adaptive = AdaptiveModel(lr(), task="regression")
    assert list(linear_parts(adaptive)) == [adaptive.current]


def test_learners_expose_their_global_counters_and_take_merged_ones() -> None:
    config = load_config(None)
    copies = [{lr.name: lr for lr in build_learners(config)} for _ in range(2)]
    risk = [c["risk"] for c in copies]
    risk[0].n_labels, risk[0].n_frauds = 300, 6  # type: ignore[attr-defined]
    risk[1].n_labels, risk[1].n_frauds = 250, 5  # type: ignore[attr-defined]
    merger = Merger()
    merged = merger.merge({i: r.global_params() for i, r in enumerate(risk)})
    for r in risk:
        r.set_global_params(merged)
    # Together they reached min_labels / min_fraud_labels: both switch from the anomaly detector.
    assert [(r.n_labels, r.n_frauds, r.source) for r in risk] == [(550, 11, "model")] * 2  # type: ignore[attr-defined]
    pricing = [c["pricing"] for c in copies]
    pricing[0]._outcomes = 1500  # type: ignore[attr-defined]
    pricing[1]._outcomes = 700  # type: ignore[attr-defined]
    merged = Merger().merge({i: p.global_params() for i, p in enumerate(pricing)})
    pricing[0].set_global_params(merged)
    assert pricing[0]._outcomes == 2200  # type: ignore[attr-defined]


def test_half_space_tree_masses_of_two_tasks_make_one_detectors_window() -> None:
    from river import anomaly

    from stream.sync import assign_hst_params, hst_params

    def hst() -> anomaly.HalfSpaceTrees:
        return anomaly.HalfSpaceTrees(n_trees=3, height=4, window_size=40, seed=5)

    rng = np.random.default_rng(0)
    xs = [{"a": float(rng.random()), "b": float(rng.random())} for _ in range(40)]
    one, tasks = hst(), [hst(), hst()]
    for i, x in enumerate(xs):
        one.learn_one(x)  # the 40th closes its first window: reference = all 40
        tasks[i % 2].learn_one(x)  # 20 each: neither closes a window alone
    assert tasks[0]._first_window and not one._first_window
    merger = Merger()
    merged = merger.merge({i: hst_params(t, None) for i, t in enumerate(tasks)})
    windows = [assign_hst_params(t, merged, None) for t in tasks]
    probe = {"a": 0.3, "b": 0.9}
    assert tasks[0].score_one(probe) == tasks[1].score_one(probe) == one.score_one(probe) > 0
    # From now on the sync closes the windows: more learning, merged again, stays one detector's.
    for i, t in enumerate(tasks):
        merger.applied(i, hst_params(t, windows[i]))
    for i, x in enumerate(xs):
        one.learn_one(x)
        tasks[i % 2].learn_one(x)
    merged = merger.merge({i: hst_params(t, windows[i]) for i, t in enumerate(tasks)})
    for i, t in enumerate(tasks):
        windows[i] = assign_hst_params(t, merged, windows[i])
    assert tasks[0].score_one(probe) == tasks[1].score_one(probe) == pytest.approx(one.score_one(probe))


def test_recommendation_item_vectors_and_popularity_merge_across_tasks() -> None:
    from stream.events import Click

    config = load_config(None)
    copies = [next(lr for lr in build_learners(config) if lr.name == "recommendation") for _ in range(2)]
    for i in range(40):
        copy = copies[i % 2]
        click = Click(event_id=f"e{i}", ts=1_000 * i, user_id=f"u{i % 4}", item_id=f"i{i % 5}")
        copy.predict(click)
        copy.learn(click)
    merger = Merger()
    merged = merger.merge({i: c.global_params() for i, c in enumerate(copies)})
    for i, c in enumerate(copies):
        c.set_global_params(merged)
        merger.applied(i, c.global_params())
    held = [c.global_params() for c in copies]
    tables = [h.weights["i"] for h in held]
    assert all(isinstance(t, Table) for t in tables)
    index = [t.index() for t in tables]  # type: ignore[union-attr]
    for item in ("i0", "i1", "i2", "i3", "i4"):
        a, b = (t.matrix[i[item]] for t, i in zip(tables, index, strict=True))  # type: ignore[union-attr]
        assert a.tolist() == pytest.approx(b.tolist())
    alone = next(lr for lr in build_learners(config) if lr.name == "recommendation")
    for i in range(40):
        alone.learn(Click(event_id=f"e{i}", ts=1_000 * i, user_id=f"u{i % 4}", item_id=f"i{i % 5}"))
    popularity = alone.global_params()  # one copy that saw every click: the merged counts
    for item, value in popularity.decayed.items():
        for h in held:
            assert h.decayed[item] * math.exp((h.ref_ms - popularity.ref_ms) / h.tau_ms) == pytest.approx(value)
