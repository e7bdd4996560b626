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
