"""The simulator: deterministic for a seed, in the event contracts, realistic, with usable ground truth."""

from __future__ import annotations

import collections
import filecmp
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from stream.config import Config
from stream.events import EVENT_TYPES, Decoder, InvalidEvent
from stream.recording import Recording
from stream.simulate import GroundTruth, SimConfig, Simulation, simulate, write_recording

SMALL = SimConfig(seed=11, events=20_000, n_users=800, n_items=300, bad_records=8)


@pytest.fixture(scope="module")
def big() -> tuple[list[tuple[str, bytes | None, bytes, int]], GroundTruth]:
    """100k events of the default world: enough for the statistical checks."""
    sim = Simulation(SimConfig(seed=5, events=100_000))
    return list(sim), sim.truth


def _decoded(events: list[tuple[str, bytes | None, bytes, int]]) -> list[tuple[str, dict]]:
    out = []
    for stream, _, value, _ in events:
        try:
            out.append((stream, json.loads(value)))
        except (ValueError, UnicodeDecodeError):
            continue
    return out


# -- determinism ------------------------------------------------------------------


def test_same_seed_same_bytes() -> None:
    assert list(simulate(SMALL)) == list(simulate(SMALL))


def test_other_seed_other_stream() -> None:
    other = SimConfig(seed=12, events=20_000, n_users=800, n_items=300, bad_records=8)
    assert list(simulate(SMALL))[:2000] != list(simulate(other))[:2000]


def test_recordings_of_one_seed_are_byte_identical(tmp_path: Path) -> None:
    topics = Config().input_topics()
    write_recording(Simulation(SMALL), tmp_path / "a", topics, progress=False)
    write_recording(Simulation(SMALL), tmp_path / "b", topics, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files
    _match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_fixture_recording_regenerates_identically(tmp_path: Path) -> None:
    """tests/fixtures/recording is what make_recording.py writes (same numpy: same random streams)."""
    from fixtures.make_recording import FIXTURE, PATH, make

    committed = Recording(PATH)
    if committed.manifest.source.get("numpy") != np.__version__:
        pytest.skip(f"fixture made with numpy {committed.manifest.source.get('numpy')}, this is {np.__version__}")
    fresh = Recording(make(tmp_path / "fixture"))
    assert fresh.manifest.source["config"] == json.loads(json.dumps(FIXTURE.to_dict()))
    assert [(e.file, e.records, e.sha256) for e in fresh.partitions] == [
        (e.file, e.records, e.sha256) for e in committed.partitions
    ]
    assert (tmp_path / "fixture" / "truth.json").read_bytes() == (PATH / "truth.json").read_bytes()


# -- contracts and order ------------------------------------------------------------


def test_exact_count_event_time_order_and_contracts() -> None:
    sim = Simulation(SMALL)
    events = list(sim)
    assert len(events) == SMALL.events == sim.truth.events
    assert all(a[3] <= b[3] for a, b in itertools.pairwise(events))
    bad = {b["index"]: b for b in sim.truth.bad_records}
    assert len(bad) == 8
    assert {b["kind"] for b in bad.values()} == {"invalid_json", "non_utf8", "missing_field", "negative_price"}
    decoders = {s: Decoder(t) for s, t in EVENT_TYPES.items()}
    keys = {"clicks": "user_id", "purchases": "user_id", "prices": "item_id", "fraud_labels": "order_id"}
    for i, (stream, key, value, ts) in enumerate(events):
        if i in bad:
            assert stream == bad[i]["stream"]
            assert sim.headers(i) == [("stream.sim.corrupt", bad[i]["kind"].encode())]
            with pytest.raises(InvalidEvent):
                decoders[stream].decode(value)
            continue
        assert sim.headers(i) is None
        event = decoders[stream].decode(value)
        assert event.ts == ts
        assert key == getattr(event, keys[stream]).encode()
    non_utf8 = next(events[i][2] for i, b in bad.items() if b["kind"] == "non_utf8")
    with pytest.raises(UnicodeDecodeError):
        non_utf8.decode()


def test_duration_mode_stays_in_its_window() -> None:
    cfg = SimConfig(seed=1, events=None, duration_s=3 * 3600, n_users=500, n_items=200)
    sim = Simulation(cfg)
    events = list(sim)
    assert events
    assert all(cfg.start_ts <= ts < cfg.start_ts + 3 * 3600 * 1000 for *_, ts in events)
    assert [d.kind for d in sim.truth.drifts] == ["taste_shift", "elasticity_change", "fraud_pattern"]
    assert all(d.index is not None for d in sim.truth.drifts)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SimConfig(events=10, duration_s=10)
    with pytest.raises(ValueError, match="elasticities"):
        SimConfig(elasticity_range=(-2.0, -0.5))


# -- realism -----------------------------------------------------------------------


def test_fraud_is_about_one_percent_and_labels_come_late_for_most(big) -> None:
    events, truth = big
    assert 0.006 <= len(truth.frauds) / truth.orders <= 0.015
    labels = [d for s, d in _decoded(events) if s == "fraud_labels"]
    assert labels and all(label["is_fraud"] for label in labels)  # chargebacks only by default
    assert {label["order_id"] for label in labels} <= set(truth.frauds)
    due = [f for f in truth.frauds.values() if f["label_ts"] is not None and f["label_ts"] <= truth.end_ts]
    assert all(f["label_ts"] > f["ts"] for f in due)
    # Most frauds get a label, some never do.
    with_label = sum(f["label_ts"] is not None for f in truth.frauds.values())
    assert 0.7 <= with_label / len(truth.frauds) < 1.0


def test_fraud_patterns_are_recognisable(big) -> None:
    """Pattern A (before and after the fraud drift): young accounts shipping
    abroad, big amounts; pattern B (after it): gift cards in bulk."""
    events, truth = big
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for stream, d in _decoded(events):
        if stream != "purchases" or "unit_price" not in d:
            continue
        fraud = truth.frauds.get(d["order_id"])
        c = counts[fraud["pattern"] if fraud else "legit"]
        c["n"] += 1
        c["abroad"] += d["shipping_country"] != d["country"]
        c["young"] += d["account_age_days"] < 7
        c["gift_card"] += d["payment_method"] == "gift_card"
        c["quantity"] += d["quantity"]
        c["amount"] += d["quantity"] * d["unit_price"]
    legit, a, b = counts["legit"], counts["A"], counts["B"]
    assert a["n"] and b["n"]

    def share(c: collections.Counter[str], feature: str) -> float:
        return c[feature] / c["n"]

    for feature in ("abroad", "young"):
        assert share(a, feature) > 5 * share(legit, feature), feature
    assert share(b, "gift_card") > 5 * share(legit, "gift_card")
    assert share(b, "quantity") > 2 * share(legit, "quantity")
    assert share(a, "amount") > 2 * share(legit, "amount")


def test_popularity_is_zipf_like(big) -> None:
    events, _ = big
    clicks = collections.Counter(d["item_id"] for s, d in _decoded(events) if s == "clicks")
    counts = np.array(sorted(clicks.values(), reverse=True), dtype=float)
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.4
    rank = np.arange(1, len(counts) + 1)
    head = (rank >= 5) & (rank <= 200)
    slope = np.polyfit(np.log(rank[head]), np.log(counts[head]), 1)[0]
    assert -1.6 < slope < -0.6


def test_lower_relative_price_converts_better(big) -> None:
    events, truth = big
    list_price = dict(zip(truth.item_ids, truth.list_price.tolist(), strict=True))
    views, buys = collections.Counter(), collections.Counter()

    def bucket(rel: float) -> str:
        return "low" if rel < 0.95 else "high" if rel > 1.05 else "list"

    for stream, d in _decoded(events):
        if stream == "clicks":
            views[bucket(d["price"] / list_price[d["item_id"]])] += 1
        elif stream == "purchases" and "unit_price" in d and d["order_id"] not in truth.frauds:
            buys[bucket(d["unit_price"] / list_price[d["item_id"]])] += 1
    rate = {b: buys[b] / views[b] for b in ("low", "list", "high")}
    assert rate["low"] > 1.3 * rate["list"] > 1.3 * rate["high"], rate


def test_clicks_follow_true_tastes_and_the_shift(big) -> None:
    events, truth = big
    shift = next(d for d in truth.drifts if d.kind == "taste_shift")
    shifted = set(shift.details["users"])
    in_top = collections.Counter()
    for stream, d in _decoded(events):
        if stream != "clicks" or d["user_id"] not in shifted:
            continue
        phase = "before" if d["ts"] < shift.ts else "after"
        old_tops = set(truth.top_categories(d["user_id"], shift.ts - 1))
        in_top[phase, "n"] += 1
        in_top[phase, "old"] += d["category"] in old_tops
        in_top[phase, "now"] += d["category"] in truth.top_categories(d["user_id"], d["ts"])
    # Users click their true top-2 categories far above chance, and after the
    # shift they follow their new tastes, not their old ones.
    assert in_top["before", "now"] / in_top["before", "n"] > 0.5
    assert in_top["after", "now"] / in_top["after", "n"] > 0.5
    assert in_top["after", "old"] / in_top["after", "n"] < 0.3


def test_price_changes_are_emitted_and_cover_the_grid(big) -> None:
    events, truth = big
    list_price = dict(zip(truth.item_ids, truth.list_price.tolist(), strict=True))
    prices = [d for s, d in _decoded(events) if s == "prices" and d["price"] > 0]
    assert len(prices) > len(truth.item_ids)  # the snapshot, then changes
    multipliers = {round(d["price"] / list_price[d["item_id"]], 1) for d in prices}
    assert {0.8, 0.9, 1.0, 1.1, 1.2} <= multipliers


# -- ground truth --------------------------------------------------------------------


def test_truth_round_trips_and_scores(tmp_path: Path) -> None:
    sim = Simulation(SMALL)
    list(sim)
    sim.truth.save(tmp_path / "truth.json")
    loaded = GroundTruth.load(tmp_path / "truth.json")
    assert loaded.to_dict() == sim.truth.to_dict()

    change = next(d for d in loaded.drifts if d.kind == "elasticity_change")
    cat = change.details["categories"][0]
    item = next(i for i in loaded.item_ids if loaded.category_of(i) == cat)
    before, after = loaded.optimal_price(item, change.ts - 1), loaded.optimal_price(item, change.ts)
    assert after < before  # more price-sensitive: the optimal price drops
    assert loaded.pricing_regret(item, before, change.ts - 1) == pytest.approx(0.0, abs=1e-12)
    assert loaded.pricing_regret(item, before, change.ts) > 0

    order = next(iter(loaded.frauds))
    legit = [f"o{k}" for k in range(1, 50) if f"o{k}" not in loaded.frauds]
    perfect = {order: 0.9, **dict.fromkeys(legit, 0.1)}
    assert loaded.fraud_auc(perfect) == 1.0
    assert loaded.fraud_auc(dict.fromkeys([order, *legit], 0.5)) == 0.5

    drifts = loaded.drift_points(["clicks"])
    score = loaded.score_detections([(drifts[0].ts + 60_000, None), (loaded.start_ts + 1, None)], ["clicks"])
    assert score.drifts[0]["delay_ms"] == 60_000
    assert score.false_alarms == 1 and score.detections == 2


def test_taste_hit_rate_against_truth() -> None:
    sim = Simulation(SMALL)
    truth = sim.truth
    user = truth.user_ids[0]
    tops = truth.top_categories(user, truth.start_ts)
    liked = [i for i in truth.item_ids if truth.category_of(i) in tops][:5]
    other = [i for i in truth.item_ids if truth.category_of(i) not in tops][:5]
    assert truth.taste_hit_rate(user, liked, truth.start_ts) == 1.0
    assert truth.taste_hit_rate(user, other, truth.start_ts) == 0.0
    assert truth.taste_hit_rate("nobody", liked, truth.start_ts) is None


# -- demand (SimConfig.demand) ------------------------------------------------------


def test_demand_world_stocks_out_restocks_and_censors(tmp_path: Path) -> None:
    from stream.world import DemandSim

    config = SimConfig(seed=2, events=20_000, n_users=500, n_items=60, sessions_per_s=0.05, demand=DemandSim())
    sim = Simulation(config)
    events = list(sim)
    demand = sim.truth.demand
    assert demand is not None and demand["stockouts"] and demand["restocks"] and demand["lost_units"] > 0
    assert "demand_shift" in [d.kind for d in sim.truth.drifts]
    # Every sell-out is reported as a price event with stock 0 at its time.
    zero = {
        (json.loads(v)["item_id"], ts) for s, _, v, ts in events if s == "prices" and json.loads(v).get("stock") == 0
    }
    assert {(o["item_id"], o["start"]) for o in demand["stockouts"]} <= zero
    # No item sells while it is out of stock (its demand is lost).
    for o in demand["stockouts"]:
        end = o["end"] if o["end"] is not None else sim.truth.end_ts + 1
        sold = [ts for s, _, v, ts in events if s == "purchases" and json.loads(v)["item_id"] == o["item_id"]
                and o["start"] < ts < end and json.loads(v)["order_id"] not in sim.truth.frauds]  # fmt: skip
        assert not sold, o
    assert list(simulate(config)) == events  # deterministic
    # The truth round-trips with its demand part, and without demand the document has none.
    sim.truth.save(tmp_path / "truth.json")
    loaded = GroundTruth.load(tmp_path / "truth.json")
    assert loaded.demand == json.loads(json.dumps(demand)) and loaded.config == config
    assert "demand" not in Simulation(SMALL).truth.to_dict()["config"]
