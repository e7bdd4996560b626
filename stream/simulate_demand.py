"""The simulator's demand world (``SimConfig.demand``): daily and weekly seasonality, promotions,
stock drawn down by sales, sell-outs (demand lost while out of stock: censored) and restocks, and the
demand shift drift; drawn from its own generator, so the other streams stay as they are without it.
``stream.simulate`` runs it alongside the rest of the world.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from stream.events import Price
from stream.world import (
    DAY_MS,
    DriftPoint,
    World,
)

__all__ = ["Demand", "Prices"]


class Prices(Protocol):
    """What the demand world needs of the simulation's evolving state (``stream.simulate``)."""

    n_price: int

    def next_seq(self, n: int) -> range: ...
    def price_at(self, items: np.ndarray, ts: np.ndarray) -> np.ndarray: ...


class Demand:
    """Demand seasonality, promotions, stock and restocks (``SimConfig.demand``), from its own generator."""

    def __init__(self, sim: World) -> None:
        self.sim = sim
        c = sim.config
        d = c.demand
        assert d is not None
        self.d = d
        rng = sim._rng_demand
        n = c.n_items
        self.mult = np.ones(c.n_categories)
        # Expected units a day per item: clicks a day x the item's share of clicks (its popularity
        # within its category x the category's share) x conversion at list price x mean quantity.
        clicks_per_day = c.sessions_per_s * 86_400 * c.mean_clicks
        share = (
            sim.popularity
            / sim.category_weights[sim.item_cat]
            * (sim.category_weights / sim.category_weights.sum())[sim.item_cat]
        )
        daily = clicks_per_day * share * c.base_conversion * sim.competitor_factor * 1.3 * 3.0  # x3: taste boost
        self.level = np.maximum(np.ceil(daily * rng.uniform(*d.cover_days_range, n)), 3).astype(np.int64)
        self.stock = self.level.copy()
        period_ms = int(d.restock_every_s * 1000)
        self.period_ms = period_ms
        self.next_restock = c.start_ts + rng.integers(1, period_ms, n)
        self.out_since: dict[int, int] = {}
        self.truth: dict[str, Any] = {"stockouts": [], "restocks": [], "lost_units": 0, "sold_units": 0}
        sim.truth.demand = self.truth
        self._snapshot_done = False

    def reported_stock(self, items: np.ndarray) -> list[int | None]:
        if not self._snapshot_done:
            self._snapshot_done = True
            return self.stock[items].tolist()
        return [None] * len(items)

    def season(self, t0: int, t1: int) -> float:
        """The session rate's multiplier over ``[t0, t1)`` (at its middle)."""
        d = self.d
        mid = (t0 + t1) // 2
        hour = (mid % DAY_MS) / 3_600_000
        weekday = (mid // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday: 0 = Monday
        daily = 1.0 + d.daily_amplitude * np.cos(2 * np.pi * (hour - d.peak_hour) / 24)
        return float(daily * (1.0 + d.weekend_uplift if weekday >= 5 else 1.0))

    def uplift(self, rel: np.ndarray, cat: np.ndarray) -> np.ndarray:
        d = self.d
        return np.where(rel <= d.promo_below, d.promo_uplift, 1.0) * self.mult[cat]

    def sell(self, state: Prices, enc: Any, out: list[Any], t: int, item: int, q: int) -> int:
        """Units of ``q`` sold from stock at ``t`` (0: out of stock); a sell-out is reported."""
        have = int(self.stock[item])
        sold = min(q, have)
        self.truth["lost_units"] += q - sold
        if sold == 0:
            return 0
        self.stock[item] = have - sold
        self.truth["sold_units"] += sold
        if have == sold:
            self.out_since[item] = t
            self.truth["stockouts"].append({"item_id": self.sim.item_ids[item], "start": t, "end": None})
            out.append(self._stock_event(state, enc, t, item, 0))
        return sold

    def restocks(self, state: Prices, t0: int, t1: int, enc: Any) -> list[Any]:
        """Periodic review: items due in ``[t0, t1)`` are filled up to their level."""
        due = np.flatnonzero(self.next_restock < t1)
        out: list[Any] = []
        for i in due.tolist():
            t = max(int(self.next_restock[i]), t0)
            self.next_restock[i] += self.period_ms
            self.stock[i] = self.level[i]
            self.truth["restocks"].append({"item_id": self.sim.item_ids[i], "ts": t})
            start = self.out_since.pop(i, None)
            if start is not None:
                for o in reversed(self.truth["stockouts"]):
                    if o["item_id"] == self.sim.item_ids[i] and o["end"] is None:
                        o["end"] = t
                        break
            out.append(self._stock_event(state, enc, t, i, int(self.level[i])))
        return out

    def _stock_event(self, state: Prices, enc: Any, t: int, i: int, stock: int) -> Any:
        sim = self.sim
        price = float(state.price_at(np.array([i]), np.array([t]))[0])
        comp = round(float(sim.list_price[i] * sim.competitor_factor[i]), 2)
        state.n_price += 1
        value = enc(
            Price(f"pr{state.n_price}", t, sim.item_ids[i], price, sim.cost_l[i], comp, stock,
                  sim.cat_names[sim.item_cat_l[i]])
        )  # fmt: skip
        return (t, state.next_seq(1)[0], "prices", sim.item_id_b[i], value)

    def shift(self, ts: int) -> DriftPoint:
        sim, d = self.sim, self.d
        n_cat = len(sim.cat_names)
        affected = np.flatnonzero(sim._rng_demand.random(n_cat) < d.shift_share)
        if len(affected) == 0:
            affected = np.array([0])
        self.mult[affected] *= d.shift_factor
        return DriftPoint(
            "demand_shift",
            ts,
            None,
            ["purchases"],
            f"demand x{d.shift_factor} in {len(affected)} categories",
            {"categories": [sim.cat_names[int(k)] for k in affected], "factor": d.shift_factor},
            ["demand"],
        )
