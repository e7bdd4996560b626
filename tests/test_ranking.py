"""The ranking learner (search and ads): contract, labels, position bias, exploration, quality vs truth."""

from __future__ import annotations

import json
import pickle
from functools import cache
from typing import Any

import msgspec
import numpy as np
import pytest

from stream.config import parse_config
from stream.errors import InvalidEvent
from stream.events import EVENT_TYPES, AdCandidate, Click, Decoder, Purchase, Search
from stream.learners.ranking import RankingLearner, RankingSpec
from stream.simulate import SimConfig, Simulation, simulate
from stream.world import SEARCH_SETTINGS

TOPICS = {"searches": "searches", "clicks": "clicks", "purchases": "purchases"}


def learner(**spec: Any) -> RankingLearner:
    config = parse_config({"learners": {"ranking": {"kind": "ranking", **spec}}})
    built = config.learners["ranking"].build("ranking", config.input_topics())
    assert isinstance(built, RankingLearner)
    return built


def search(rid: str, ts: int, cands: list[str], user: str = "u1", query: str | None = None) -> Search:
    return Search(f"e-{rid}", ts, user, rid, "search", list(cands), query)


def feed(lr: RankingLearner, event: Any) -> Any:
    out = lr.predict(event)
    lr.learn(event)
    return out


# -- the contract -----------------------------------------------------------------------


def decode(doc: dict[str, Any]) -> Search:
    return Decoder(Search).decode(json.dumps(doc).encode())


BASE = {"event_id": "e", "ts": 1, "user_id": "u", "request_id": "r", "kind": "search", "candidates": ["a", "b"]}


def test_search_contract_accepts_both_kinds_and_rejects_mixed_or_unbounded_candidates() -> None:
    assert decode(BASE).candidates == ["a", "b"]
    ads = decode({**BASE, "kind": "ads", "candidates": [{"item_id": "a", "bid": 0.5}]})
    assert ads.candidates == [AdCandidate("a", 0.5)]
    for bad in [
        {**BASE, "kind": "ads"},  # ids where ads are expected
        {**BASE, "candidates": [{"item_id": "a", "bid": 1.0}]},  # ads in a search
        {**BASE, "candidates": [f"i{k}" for k in range(201)]},
        {**BASE, "candidates": ["x" * 257]},
        {**BASE, "kind": "banner"},
        {**BASE, "query": "q" * 257},
        {**BASE, "kind": "ads", "candidates": [{"item_id": "a", "bid": -1}]},
        {**BASE, "kind": "ads", "candidates": [{"item_id": "a", "bid": 2e9}]},
    ]:
        with pytest.raises(InvalidEvent):
            decode(bad)


def test_clicks_and_purchases_without_the_new_fields_encode_as_before() -> None:
    click = Click("c", 1, "u", "i", "s", "cat", 1.0, "home")
    assert b"request_id" not in msgspec.json.encode(click) and b"position" not in msgspec.json.encode(click)
    tagged = Decoder(Click).decode(msgspec.json.encode(Click("c", 1, "u", "i", request_id="r", position=3)))
    assert (tagged.request_id, tagged.position) == ("r", 3)
    assert "searches" in EVENT_TYPES and Purchase.__struct_fields__[-2:] == ("request_id", "position")


# -- labels, cascade and propensities ------------------------------------------------------


def test_cascade_learns_clicks_as_positives_and_what_was_above_them_as_negatives() -> None:
    lr = learner(min_requests=0, label_window_s=60)
    feed(lr, search("r1", 0, ["a", "b", "c", "d", "e"]))
    feed(lr, Click("c1", 1_000, "u1", "c", request_id="r1", position=2))
    assert lr.n_learned == 0  # learned when the window closes
    lr.advance(61_001)
    assert lr.n_learned == 3  # c positive; a and b negatives; d and e (below the click) not learned
    stats = lr.label_stats()
    assert (stats["received"], stats["joined"], stats["expired"]) == (1, 1, 0)
    # A request without clicks teaches the model nothing (it counts as expired).
    feed(lr, search("r2", 70_000, ["a", "b"]))
    lr.advance(200_000)
    assert lr.n_learned == 3 and lr.label_stats()["expired"] == 1


def test_click_without_request_id_answers_the_users_latest_open_request_holding_the_item() -> None:
    lr = learner(min_requests=0, label_window_s=60)
    feed(lr, search("r1", 0, ["a", "b"]))
    feed(lr, search("r2", 1_000, ["c", "b"]))
    feed(lr, Click("c1", 2_000, "u1", "b"))  # the latest request with b: r2
    feed(lr, Click("c2", 2_500, "u1", "zz"))  # nobody's candidate
    feed(lr, Click("c3", 2_600, "u2", "a"))  # another user's
    assert lr._pending["r2"].clicks == {1: 1.0} and lr._pending["r1"].clicks == {}
    feed(lr, Purchase("p1", 3_000, "o1", "u1", "b", 1, 9.5))  # adds to the click's weight
    assert lr._pending["r2"].clicks == {1: 3.0} and lr.purchases_joined == 1
    lr.advance(100_000)
    feed(lr, Click("c4", 100_001, "u1", "a", request_id="r1"))  # its window closed: late
    stats = lr.label_stats()
    assert stats == {"received": 4, "joined": 1, "unmatched": 3, "late": 1, "expired": 1, "evicted": 0}


def test_positive_weight_is_the_inverse_examination_of_the_position_clipped() -> None:
    lr = learner(min_requests=0, label_window_s=60, min_propensity=0.25)
    weights: list[float] = []
    original = lr.model.learn_one

    def spy(x: dict[str, float], y: bool, w: float = 1.0) -> None:
        weights.append(w if y else -w)
        original(x, y, w=w)

    lr.model.learn_one = spy  # type: ignore[method-assign]
    lr.examination["search"] = np.array([1.0, 0.5, 0.3, 0.25] + [0.25] * 16)
    feed(lr, search("r1", 0, ["a", "b", "c"]))
    feed(lr, Click("c1", 1_000, "u1", "b", request_id="r1"))
    lr.advance(61_001)
    assert weights == [-1.0, 2.0]


def test_duplicate_candidates_count_once_and_an_empty_request_gets_an_empty_ranking() -> None:
    lr = learner(min_requests=0)
    out = feed(lr, search("r1", 0, ["a", "b", "a", "c", "b"]))
    assert [r.item_id for r in out.items] == ["a", "b", "c"]
    assert feed(lr, search("r2", 1, [])).items == []


# -- ads ----------------------------------------------------------------------------------------


def ads(rid: str, ts: int, bids: dict[str, float]) -> Search:
    return Search(f"e-{rid}", ts, "u1", rid, "ads", [AdCandidate(i, b) for i, b in bids.items()])


def test_ads_are_ordered_by_expected_value_and_exploration_is_reported() -> None:
    lr = learner(min_requests=0, exploration=0.0)
    out = feed(lr, ads("r1", 0, {"a": 0.1, "b": 0.9, "c": 0.5}))
    assert [r.item_id for r in out.items] == ["b", "c", "a"] and out.explored == 0
    for r in out.items:
        assert r.expected_value == pytest.approx(r.p_click * r.bid) and r.explored is False
    lr = learner(min_requests=0, exploration=0.3, ad_slots=2)
    explored = sum(feed(lr, ads(f"r{k}", k, {f"i{j}": 1.0 + j for j in range(8)})).explored for k in range(2000))
    assert 0.25 < explored / 4000 < 0.35
    assert lr.ranking.get("exploration_rate", "cumulative") == pytest.approx(explored / 4000)


def test_search_items_carry_no_ad_fields() -> None:
    out = feed(learner(min_requests=0), search("r1", 0, ["a"]))
    assert set(msgspec.json.decode(msgspec.json.encode(out.items[0]))) == {"item_id", "score", "p_click"}


# -- the simulator and the truth ----------------------------------------------------------------

SIM = SimConfig(seed=5, events=60_000, n_users=2_000, n_items=500, searches_per_session=1.0)


def test_search_settings_change_nothing_while_searches_are_off() -> None:
    base = SimConfig(seed=2, events=3_000, n_users=200, n_items=100)
    other = SimConfig(seed=2, events=3_000, n_users=200, n_items=100, ads_share=0.9, engine_noise=3.0)
    assert list(simulate(base)) == list(simulate(other))
    assert not set(SEARCH_SETTINGS) & set(base.to_dict())
    assert "search" not in Simulation(base).truth.to_dict()


@cache
def run_sim() -> tuple[RankingLearner, list[tuple[float, float]], list[tuple[float, float]]]:
    sim = Simulation(SIM)
    lr = learner(shown_order="original")
    dec = {s: Decoder(EVENT_TYPES[s]).decode for s in TOPICS}
    search_q: list[tuple[float, float]] = []
    ads_q: list[tuple[float, float]] = []
    truth = sim.truth
    for stream, _, value, _ in sim:
        if stream not in TOPICS:
            continue
        event = dec[stream](value)
        out = feed(lr, event)
        if out is None:
            continue
        ours = [r.item_id for r in out.items]
        user, query, ts = event.user_id, event.query, event.ts
        if event.kind == "search":
            search_q.append(
                (truth.ranking_ndcg(user, query, ours, ts), truth.ranking_ndcg(user, query, event.candidates, ts))
            )
        else:
            bid = {c.item_id: c.bid for c in event.candidates}
            by_bid = sorted(bid, key=lambda i: -bid[i])
            ads_q.append((truth.ads_value(user, query, ours, [bid[i] for i in ours], ts),
                          truth.ads_value(user, query, by_bid, [bid[i] for i in by_bid], ts)))  # fmt: skip
    return lr, search_q, ads_q


def test_examination_by_position_is_estimated_close_to_the_truth() -> None:
    lr, _, _ = run_sim()
    true = (1.0 + np.arange(5)) ** -SIM.position_bias
    assert np.allclose(lr.examination["search"][:5], true, atol=0.12), lr.examination["search"][:5]


def test_our_order_beats_the_engines_order_on_true_relevance() -> None:
    _, search_q, ads_q = run_sim()
    late = np.array(search_q[len(search_q) // 2 :]).mean(axis=0)
    assert late[0] > 1.1 * late[1], late
    late_ads = np.array(ads_q[len(ads_q) // 2 :]).mean(axis=0)
    assert late_ads[0] > late_ads[1], late_ads


def test_online_metrics_and_a_pickle_mid_stream() -> None:
    lr, _, _ = run_sim()
    quality = {(m, w): v for m, w, v in lr.quality()}
    for name in ("ndcg_at_10", "ndcg_at_10_original", "mrr", "mrr_original", "ctr", "revenue_per_request",
                 "exploration_rate", "log_loss"):  # fmt: skip
        assert 0 <= quality[(name, "cumulative")] < 10, name
    assert quality[("exploration_rate", "cumulative")] == pytest.approx(0.1, abs=0.03)
    restored = pickle.loads(pickle.dumps(lr))
    event = search("rx", lr.now + 1, ["i1", "i2", "i3"], user="u7", query="books")
    assert msgspec.json.encode(restored.predict(event)) == msgspec.json.encode(lr.predict(event))


def test_any_river_classifier_serves_through_the_generic_path() -> None:
    lr = learner(min_requests=0, model={"class": "naive_bayes.GaussianNB"})
    out = feed(lr, search("r1", 0, ["a", "b"]))
    feed(lr, Click("c1", 10, "u1", "b", request_id="r1"))
    lr.advance(10_000_000)
    assert len(out.items) == 2 and lr.n_learned == 2
    with pytest.raises(Exception, match="classifier"):
        RankingSpec(model={"class": "linear_model.LinearRegression"}).validate("x")


def test_drift_watches_the_squared_error_and_can_switch_models() -> None:
    from stream.drift import AdaptiveModel

    lr = learner(min_requests=0, label_window_s=60, drift={"detector": "adwin", "reaction": "switch"})
    assert isinstance(lr.model, AdaptiveModel) and lr.evaluation.drift.monitor is lr.model
    dec = {s: Decoder(EVENT_TYPES[s]).decode for s in TOPICS}
    for stream, _, value, _ in simulate(SimConfig(seed=1, events=6_000, n_users=300, n_items=150,
                                                  searches_per_session=2.0)):  # fmt: skip
        if stream in TOPICS:
            feed(lr, dec[stream](value))
    drift = lr.evaluation.drift
    assert lr.n_learned > 500 and isinstance(drift.detections, int) and drift.worse <= drift.detections
    restored = pickle.loads(pickle.dumps(lr))
    assert restored.evaluation.drift.detections == drift.detections
