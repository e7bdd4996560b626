"""The demand learner: forecasting moments, the seasonal naive baseline, censored demand, stock-out figures."""

from __future__ import annotations

import pickle

from stream.events import Price, Purchase
from stream.learners.demand import DemandLearner, DemandSpec

H = 3_600_000
TOPICS = {"purchases": "purchases", "prices": "prices"}


def _learner(**kw: object) -> DemandLearner:
    spec = DemandSpec(**{"horizons_s": [3600.0], "min_outcomes": 0, "lead_time_s": 3600.0, **kw})  # type: ignore[arg-type]
    return spec.build("demand", TOPICS)


def _feed(learner: DemandLearner, event: object) -> object:
    out = learner.predict(event)
    learner.learn(event)
    return out


def _buy(n: int, ts: int, item: str = "i1", q: int = 1) -> Purchase:
    return Purchase(event_id=f"b{n}", ts=ts, order_id=f"o{n}", user_id="u", item_id=item, quantity=q, unit_price=10.0)


def _price(n: int, ts: int, stock: int | None, item: str = "i1") -> Price:
    return Price(event_id=f"p{n}", ts=ts, item_id=item, price=10.0, stock=stock, category="toys")


def test_bucket_boundaries_forecast_the_items_that_sold() -> None:
    learner = _learner()
    _feed(learner, _price(0, 0, 100))
    _feed(learner, _price(1, 0, 100, item="i2"))
    _feed(learner, _buy(0, 10 * 60_000))
    out = _feed(learner, _buy(1, H + 5))  # first event of the next hour: the boundary
    assert out is not None
    assert [(f.item_id, f.ts) for f in out.forecasts] == [("i1", H)]  # i2 sold nothing
    assert _feed(learner, _buy(2, H + 10)) is None


def test_the_baseline_is_the_same_window_a_day_earlier() -> None:
    learner = _learner(min_outcomes=10**6)  # never serves the model
    _feed(learner, _price(0, 0, 10_000))
    for k in range(7):  # 7 units between 02:00 and 03:00 on day one
        _feed(learner, _buy(k, 2 * H + k * 60_000))
    out = _feed(learner, _price(1, 26 * H, None))  # day two, 02:00
    f = out.forecasts[-1]
    assert f.source == "baseline" and f.expected_units == 7.0


def test_out_of_stock_windows_are_censored_not_learned_as_zero() -> None:
    learner = _learner()
    _feed(learner, _price(0, 0, 5))
    _feed(learner, _buy(0, 60_000, q=5))  # sold out: the estimated stock is 0
    assert learner.stock_of("i1") == 0
    out = _feed(learner, _price(1, 120_000, None))
    assert out.forecasts[0].stockout_probability == 1.0
    _feed(learner, _price(2, 3 * H, 50))  # restocked; both windows above closed meanwhile
    _feed(learner, _price(3, 5 * H, None))
    assert learner.censored[0] >= 2
    learned = learner.n_learned
    # A window entirely in stock is learned.
    _feed(learner, _price(4, 7 * H, None))
    assert learner.n_learned > learned


def test_less_stock_means_a_higher_stockout_probability_and_a_larger_reorder() -> None:
    learner = _learner(min_outcomes=10**6)  # the baseline's forecast: the stock arithmetic is what is tested
    for k in range(200):
        _feed(learner, _buy(k, k * 60_000, item="i9"))  # ~60 units an hour for i9
    a = _feed(learner, _price(0, 200 * 60_000, 500, item="i9")).forecasts[-1]
    b = _feed(learner, _price(1, 200 * 60_000 + 1, 20, item="i9")).forecasts[-1]
    assert b.stockout_probability > a.stockout_probability
    assert b.reorder_suggestion > a.reorder_suggestion
    assert b.hours_of_cover < a.hours_of_cover
    assert b.interval.low <= b.expected_units <= b.interval.high and b.interval.level == 0.9


def test_pickled_mid_stream_it_continues_identically() -> None:
    learner = _learner(bucket_s=600.0)
    events = [_price(0, 0, 300)] + [_buy(k, k * 50_000) for k in range(1, 300)]
    for e in events[:150]:
        _feed(learner, e)
    copy = pickle.loads(pickle.dumps(learner))
    a = [_feed(learner, e) for e in events[150:]]
    b = [_feed(copy, e) for e in events[150:]]
    assert a == b and learner.n_learned == copy.n_learned > 0


def test_the_forecast_served_is_the_candidate_with_the_lowest_running_error() -> None:
    learner = _learner()
    for k in range(120):
        _feed(learner, _buy(k, k * 60_000))  # a unit a minute for two hours
    learner.errors[0] = [5.0, 1.0, 2.0]  # the model worse than the rate forecast
    f = _feed(learner, _price(0, 120 * 60_000 + 1, 1_000)).forecasts[0]
    assert f.source == "rate"
    learner.errors[0] = [1.0, 3.0, 2.0]
    g = _feed(learner, _price(1, 120 * 60_000 + 2, 1_000)).forecasts[0]
    assert g.source == "model"
    learner.errors[0] = [1.0, 1.01, 1.02]  # none clearly best: combined
    h = _feed(learner, _price(2, 120 * 60_000 + 3, 1_000)).forecasts[0]
    assert h.source == "combined"


def _restocked_item(counted: int) -> DemandLearner:
    """i1 sells 10 units an hour, is restocked at day 4 and day 8 (its cadence: 4 days), and
    an hour later a stock count finds ``counted`` units."""
    learner = _learner(lead_time_s=86_400.0, min_outcomes=10**6)
    _feed(learner, _price(0, 0, 5_000))
    n = 0
    for day in (4, 8):
        for h in range(day * 24 - 96, day * 24):
            for m in range(10):
                _feed(learner, _buy(n, h * H + m * 6 * 60_000 + 1))
                n += 1
        _feed(learner, _price(day, day * 24 * H, 5_000))
    _feed(learner, _price(9, 8 * 24 * H + 1, counted))
    return learner


def test_the_stockout_risk_runs_to_the_next_expected_restock() -> None:
    # 10 units an hour, the next restock expected 4 days on (~960 units needed) ...
    short, ample = _restocked_item(400), _restocked_item(3_000)
    assert short.restock_gap == ample.restock_gap == 4 * 24 * H
    a = _feed(short, _price(10, 8 * 24 * H + 2, None)).forecasts[0]
    b = _feed(ample, _price(10, 8 * 24 * H + 2, None)).forecasts[0]
    # ... 400 units last 40 hours: more than the lead time (a day), less than the cycle.
    assert a.stockout_probability is not None and a.stockout_probability < 0.5
    assert a.stockout_risk is not None and a.stockout_risk > 0.9 and a.warning
    assert b.stockout_risk is not None and b.stockout_risk < 0.1 and not b.warning
    quality = {m: v for m, _, v in short.quality()}
    assert quality["items_at_risk"] == 1.0 == quality["items_with_traffic"]


def test_without_a_restock_seen_the_risk_is_over_the_lead_time() -> None:
    learner = _learner(lead_time_s=86_400.0, min_outcomes=10**6)
    _feed(learner, _price(0, 0, 400))
    for k in range(48 * 10):  # 10 units an hour for two days: ~80 hours of stock left at most
        _feed(learner, _buy(k, k * 6 * 60_000 + 1))
    f = _feed(learner, _price(1, 48 * H + 1, 300)).forecasts[0]  # a stock count: not a restock
    assert f.stockout_risk == f.stockout_probability and not f.warning
