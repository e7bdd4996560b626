"""The recommendation learner (no broker): lists served, cold start, learning,
bounded state, quality against the popularity baseline, determinism, pickling."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest

from stream.config import ConfigError, parse_config
from stream.events import Click, Purchase
from stream.learners import build_learner
from stream.learners.recommendation import RecommendationLearner, Recommendations, RecommendationSpec
from stream.pipeline import Pipeline
from stream.recording import RecordedMessage

TOPICS = {"clicks": "clicks", "purchases": "purchases", "prices": "prices", "fraud_labels": "fraud-labels"}
T0 = 1_700_000_000_000


def learner(**params: object) -> RecommendationLearner:
    spec = msgspec.convert({"kind": "recommendation", **params}, RecommendationSpec)
    spec.validate("reco")
    return spec.build("reco", TOPICS)


def click(user: str, item: str, ts: int, category: str | None = None, n: int = 0) -> Click:
    return Click(event_id=f"c{ts}-{n}", ts=ts, user_id=user, item_id=item, category=category)


def purchase(user: str, item: str, ts: int, category: str | None = None) -> Purchase:
    return Purchase(
        event_id=f"p{ts}",
        ts=ts,
        order_id=f"o{ts}",
        user_id=user,
        item_id=item,
        quantity=1,
        unit_price=1.0,
        category=category,
    )


def feed(rec: RecommendationLearner, events: list) -> list[Recommendations | None]:
    out = []
    for e in events:
        out.append(rec.predict(e))
        rec.learn(e)
    return out


def ids(prediction: Recommendations | None) -> list[str]:
    assert prediction is not None
    return [i.item_id for i in prediction.items]


def taste_stream(
    n_events: int, *, n_users: int = 1500, n_categories: int = 12, per_category: int = 40, seed: int = 0
) -> list[Click | Purchase]:
    """Users with latent category tastes (concentrated Dirichlet); within a category,
    item popularity is Zipf. Globally popular items are a poor guess for a user."""
    rng = np.random.default_rng(seed)
    within = 1.0 / np.arange(1, per_category + 1)
    within /= within.sum()
    tastes = rng.dirichlet(np.full(n_categories, 0.1), size=n_users)
    activity = rng.pareto(1.5, n_users) + 1.0
    activity /= activity.sum()
    events: list[Click | Purchase] = []
    ts = T0
    for n, u in enumerate(rng.choice(n_users, size=n_events, p=activity)):
        c = int(rng.choice(n_categories, p=tastes[u]))
        item = f"i{c}-{int(rng.choice(per_category, p=within))}"
        ts += 100
        events.append(click(f"u{u}", item, ts, f"cat{c}", n))
        if rng.random() < 0.05:
            ts += 1
            events.append(purchase(f"u{u}", item, ts, f"cat{c}"))
    return events


@pytest.fixture(scope="module")
def tastes() -> list[Click | Purchase]:
    return taste_stream(40_000)


# -- the lists served ---------------------------------------------------------------------


def test_cold_start_list_is_popularity() -> None:
    rec = learner(k=3, popular_candidates=5)
    counts = {"a": 5, "b": 4, "c": 3, "d": 2, "e": 1}
    events = [click(f"u{item}{i}", item, T0 + 10 * i) for item, n in counts.items() for i in range(n)]
    feed(rec, events)
    out = rec.predict(click("newcomer", "z", T0 + 1000))
    assert out is not None and out.source == "popularity"
    assert ids(out) == ["a", "b", "c"]
    # Scores are the decayed counts: a little under the raw counts, in order.
    scores = [i.score for i in out.items]
    assert scores == sorted(scores, reverse=True) and 4 < scores[0] <= 5


def test_clicked_item_is_never_in_the_list(tastes: list[Click | Purchase]) -> None:
    rec = learner()
    sources = set()
    for e in tastes[:10_000]:
        out = rec.predict(e)
        if out is not None:
            assert e.item_id not in ids(out)
            sources.add(out.source)
        rec.learn(e)
    assert sources == {"model", "popularity"}
    # The popularity list skips it too.
    rec = learner(k=2, popular_candidates=3)
    events = [click(f"u{i}", item, T0 + i) for i, item in enumerate("aaabbc")]
    feed(rec, events)
    assert ids(rec.predict(click("new", "a", T0 + 10))) == ["b", "c"]


def test_list_has_k_items_when_the_catalog_allows(tastes: list[Click | Purchase]) -> None:
    rec = learner(k=7)
    outs = [o for o in feed(rec, tastes[:5_000]) if o is not None]
    assert outs and all(len(o.items) == 7 for o in outs[50:])
    assert all(len(set(ids(o))) == len(o.items) for o in outs), "no item twice in a list"
    tiny = learner(k=10, popular_candidates=11)
    out = feed(tiny, [click("u", "a", T0), click("v", "b", T0 + 1)])[-1]
    assert ids(out) == ["a"]


def test_purchases_publish_nothing_but_count_more() -> None:
    rec = learner(k=2, purchase_weight=3.0)
    assert rec.predict(purchase("u1", "p", T0)) is None
    feed(rec, [purchase("u1", "p", T0)] + [click(f"v{i}", "q", T0 + i) for i in range(2)])
    assert ids(rec.predict(click("new", "zz", T0 + 10))) == ["p", "q"]
    assert rec.n_learned == 3
    assert rec.reads == frozenset({"clicks", "purchases"})


def test_a_new_item_is_recommended_once_it_has_traffic() -> None:
    rec = learner(k=3, popular_candidates=4, popularity_half_life_s=60.0)
    old = [click(f"u{i}", f"old{i % 4}", T0 + i) for i in range(40)]
    feed(rec, old)
    assert "fresh" not in ids(rec.predict(click("x", "old0", T0 + 100)))
    # Ten minutes later (ten half-lives), a handful of clicks make it the top item.
    later = T0 + 600_000
    feed(rec, [click(f"w{i}", "fresh", later + i) for i in range(5)])
    assert ids(rec.predict(click("y", "old0", later + 10)))[0] == "fresh"


def test_model_ranks_what_goes_with_what_the_user_clicks() -> None:
    rec = learner(k=3, popular_candidates=4)
    rng = np.random.default_rng(0)
    events = []
    ts = T0
    # Ten groups of three items; each user browses one group, in random order.
    for u in range(600):
        group = u % 10
        for item in rng.permutation([f"x{group}", f"y{group}", f"z{group}"]):
            ts += 10
            events.append(click(f"u{u}", str(item), ts))
    feed(rec, events)
    feed(rec, [click("me", "x7", ts + 10)])
    out = rec.predict(click("me", "y7", ts + 20))
    assert out is not None and out.source == "model"
    # The rest of its group first (the item just clicked excluded, the one before not).
    assert set(ids(out)[:2]) == {"x7", "z7"}
    # A user the model knows: a group fan clicking elsewhere still gets their group.
    feed(rec, [click("fan", item, ts + 30 + i) for i, item in enumerate(["x3", "y3", "z3"] * 3)])
    out = rec.predict(click("fan", "x5", ts + 100))
    assert out is not None and {"y3", "z3"} & set(ids(out))


# -- quality ---------------------------------------------------------------------------------


def test_hit_rate_beats_the_popularity_baseline(tastes: list[Click | Purchase]) -> None:
    rec = learner()
    feed(rec, tastes)
    quality = {(metric, window): value for metric, window, value in rec.quality()}
    hit, baseline = quality[("hit_rate", "cumulative")], quality[("baseline_hit_rate", "cumulative")]
    assert rec.evaluation.n_evaluated > 20_000
    assert hit > 1.5 * baseline, (hit, baseline)
    assert quality[("hit_rate", "rolling")] > 1.5 * quality[("baseline_hit_rate", "rolling")]
    assert rec.evaluation.drift.n_seen == rec.evaluation.n_evaluated


def test_only_lists_served_within_the_hit_window_are_evaluated() -> None:
    rec = learner(k=2, popular_candidates=3, hit_window_s=60.0)
    feed(rec, [click("v", "b", T0), click("w", "c", T0 + 1), click("x", "b", T0 + 2)])
    feed(rec, [click("u", "a", T0 + 10)])  # served the popularity list [b, c]
    feed(rec, [click("u", "b", T0 + 30_000)])  # within a minute of it: a hit
    assert rec.evaluation.n_evaluated == 1
    feed(rec, [click("u", "c", T0 + 200_000)])  # too late to be a reaction to it
    assert rec.evaluation.n_evaluated == 1
    assert rec.evaluation.get("hit_rate", "cumulative") == 1.0


def test_drift_in_tastes_is_detected() -> None:
    rec = learner()
    before = taste_stream(15_000, seed=1)
    # The same users, new tastes: item names shuffled across categories.
    after = [
        click(e.user_id, e.item_id.replace("i", "j"), e.ts + 1_500_000 + 200 * n, e.category, n)
        for n, e in enumerate(taste_stream(15_000, seed=2))
        if type(e) is Click
    ]
    feed(rec, before)
    detections = rec.evaluation.drift.detections
    feed(rec, after)
    assert rec.evaluation.drift.detections > detections
    assert rec.evaluation.drift.worse >= 1


# -- state ---------------------------------------------------------------------------------


def test_memory_is_bounded_with_many_distinct_users() -> None:
    rec = learner(max_users=10_000, max_items=500, max_categories=20, negatives=1)
    ts = T0
    for n in range(200_000):
        ts += 10
        e = click(f"user{n}", f"item{n % 3000}", ts, f"cat{n % 50}", n)
        rec.predict(e)
        rec.learn(e)
    sizes = rec.state_sizes()
    assert sizes["users"] <= 10_000 and sizes["model_users"] <= 10_000
    assert sizes["items"] <= 500 and sizes["item_rows"] <= 500 and sizes["model_items"] <= 500
    assert sizes["categories"] <= 20 and sizes["category_tops"] <= 20
    assert sizes["max_neighbors"] <= rec.spec.max_neighbors
    assert sizes["negative_pool"] <= rec.spec.negative_pool


def test_forgotten_users_and_items_leave_the_model_and_no_stale_ids_are_served() -> None:
    rec = learner(k=5, popular_candidates=6, max_users=50, max_items=40, user_ttl_s=5.0, recent_items=3)
    ts = T0
    rng = np.random.default_rng(3)
    known_ids: set[str] = set()
    for n in range(20_000):
        ts += 50
        e = click(f"u{rng.integers(200)}", f"i{rng.integers(120)}", ts, f"c{rng.integers(5)}", n)
        out = rec.predict(e)
        known_ids = set(rec._row_of)
        assert out is not None and set(ids(out)) <= known_ids
        rec.learn(e)
    sizes = rec.state_sizes()
    assert sizes["model_users"] == sizes["users"] <= 50
    assert sizes["model_items"] == sizes["items"] == sizes["item_rows"] <= 40
    # A TTL sweep forgets users idle for longer than user_ttl_s.
    rec.learn(click("late", "i1", ts + 60_000))
    rec._users.expire(ts + 60_000)
    assert rec.state_sizes()["model_users"] == 1


def test_batch_updates_keep_the_model_and_the_ranking_matrix_in_step(tastes: list[Click | Purchase]) -> None:
    rec = learner()
    feed(rec, tastes[:3_000])
    latents = rec.model.i_latents
    for item, row in rec._row_of.items():
        assert np.array_equal(latents[item], rec.weights.vectors[row])
    assert set(latents) == set(rec._row_of)
    # The model itself answers like the mirror does.
    user = tastes[2_999].user_id
    item = tastes[2_999].item_id
    assert rec.model.predict_one(user, item) == pytest.approx(float(latents[item] @ rec.model.u_latents[user]))


@pytest.mark.parametrize(
    "params",
    [
        {"update": "sequential"},
        {"model": {"class": "reco.BiasedMF", "params": {"n_factors": 8}}},
        {"model": {"class": "reco.BiasedMF", "params": {"n_factors": 8}}, "update": "sequential"},
        {"model": {"class": "reco.Baseline"}},
        {"model": {"class": "facto.FMClassifier", "params": {"n_factors": 8}}},
        {"model": {"class": "reco.FunkMF", "params": {"optimizer": {"class": "optim.Adam"}}}},
    ],
)
def test_models_are_swapped_by_config(params: dict, tastes: list[Click | Purchase]) -> None:
    rec = learner(max_users=300, max_items=200, **params)
    outs = feed(rec, tastes[:4_000])
    assert any(o is not None and o.source == "model" and len(o.items) == 10 for o in outs)
    sizes = rec.state_sizes()
    assert sizes["model_users"] <= 300 and sizes["model_items"] <= 200
    again = learner(max_users=300, max_items=200, **params)
    assert feed(again, tastes[:4_000]) == outs


# -- reproducibility ------------------------------------------------------------------------------


def encoded(outs: list[Recommendations | None]) -> list[bytes]:
    return [msgspec.json.encode(o) for o in outs]


def test_same_events_same_predictions_and_model(tastes: list[Click | Purchase]) -> None:
    a, b = learner(), learner()
    assert encoded(feed(a, tastes[:8_000])) == encoded(feed(b, tastes[:8_000]))
    assert pickle.dumps(a.model) == pickle.dumps(b.model)
    assert list(a.model.u_latents) == list(b.model.u_latents)
    c = learner(seed=7)
    assert encoded(feed(c, tastes[:8_000])) != encoded(feed(learner(), tastes[:8_000]))


def test_pickle_round_trip_predicts_the_same(tastes: list[Click | Purchase]) -> None:
    rec = learner()
    feed(rec, tastes[:6_000])
    copy = pickle.loads(pickle.dumps(rec))
    rest = tastes[6_000:9_000]
    assert encoded(feed(copy, rest)) == encoded(feed(rec, rest))
    assert copy.evaluation.get("hit_rate", "cumulative") == rec.evaluation.get("hit_rate", "cumulative")
    # The restored model's item vectors are again the rows ranking reads.
    assert all(np.shares_memory(copy.model.i_latents[i], copy.weights.table[r]) for i, r in copy._row_of.items())


def test_checkpoint_holds_the_used_rows_not_the_capacity(tastes: list[Click | Purchase]) -> None:
    """The row arrays are sized for ``max_items``; a pickle carries only the rows in use."""
    rec = learner(max_items=100_000)
    feed(rec, tastes[:3_000])
    blob = pickle.dumps(rec)
    assert len(blob) < rec.weights.table.nbytes / 10
    copy = pickle.loads(blob)
    assert copy.weights.table.shape == rec.weights.table.shape and len(copy._item_at) == 100_000
    assert np.array_equal(copy.weights.table, rec.weights.table)
    assert np.array_equal(copy._popularity, rec._popularity)


def iter_quality(rec: RecommendationLearner) -> Iterator[str]:
    return (metric for metric, _, _ in rec.quality())


def test_quality_metrics_are_exposed() -> None:
    rec = learner()
    assert set(iter_quality(rec)) == {"hit_rate", "baseline_hit_rate"}


# -- in the pipeline ------------------------------------------------------------------------


def _record(topic: str, offset: int, event: Click | Purchase) -> RecordedMessage:
    return RecordedMessage(topic, 0, offset, (1, event.ts), event.user_id.encode(), msgspec.json.encode(event))


class _Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: object = None) -> None:
        self.records.append((topic, key, value))


def test_published_through_the_pipeline(tastes: list[Click | Purchase]) -> None:
    rec, sink = learner(), _Sink()
    pipeline = Pipeline(
        [rec],
        sink,
        contract_topics={"clicks": "clicks", "purchases": "purchases"},
        dead_letter_topic="dead-letters",
        clock=lambda: 0.0,
    )
    events = tastes[:2_000]
    for offset, e in enumerate(events):
        pipeline.process(_record("clicks" if type(e) is Click else "purchases", offset, e))
    clicks = sum(1 for e in events if type(e) is Click)
    assert len(sink.records) == clicks and {t for t, _, _ in sink.records} == {"recommendations"}
    value = sink.records[-1][2]
    assert value is not None
    out = msgspec.json.decode(value)
    assert out["learner"] == "reco" and out["prediction"]["source"] in ("model", "popularity")
    assert set(out["prediction"]["items"][0]) == {"item_id", "score"}
    assert rec.n_learned == len(events)


# -- configuration ----------------------------------------------------------------------------


def test_spec_from_toml_like_config() -> None:
    config = parse_config(
        {
            "learners": {
                "reco": {
                    "kind": "recommendation",
                    "k": 5,
                    "model": {"class": "reco.BiasedMF", "params": {"n_factors": 4}},
                    "drift_detector": "page_hinkley",
                }
            }
        }
    )
    spec = config.learners["reco"]
    assert isinstance(spec, RecommendationSpec) and spec.k == 5
    rec = build_learner("reco", spec, TOPICS)
    assert isinstance(rec, RecommendationLearner) and rec.output_topic == "recommendations"
    assert rec.model.latent_initializer.seed == spec.seed, "the learner's seed seeds the model"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"k": 10, "popular_candidates": 10}, "popular_candidates"),
        ({"candidates": 20, "popular_candidates": 30}, "candidates"),
        ({"model": {"class": "linear_model.LinearRegression"}}, "not supported"),
        ({"model": {"class": "reco.FunkMF", "params": {"factors": 3}}}, "no parameter `factors`"),
        ({"drift_params": {"nope": 1}}, "drift_params"),
        ({"max_users": 0}, "max_users"),
        ({"neighbours": 3}, "neighbours"),
    ],
)
def test_bad_specs_are_named(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"learners": {"reco": {"kind": "recommendation", **params}}})
