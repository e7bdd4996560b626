"""The quality bench: the learners against the simulator's ground truth and simple baselines.

    .venv/bin/python bench/quality.py [--seeds 0,1,2] [--lengths 30000,300000] [--json PATH] [--plot PNG]

(also section ``quality`` of ``bench/run.py``). For every seed and stream
length, the default config's recommendation, pricing and risk learners run
over the simulator's stream (test-then-train, through the backtest pipeline)
three times:

* ``report``: the default config, with the scheduled drifts (taste shift at
  40 %, elasticity change at 60 %, fraud pattern at 75 % of the stream);
* ``switch``: the same with ``reaction = "switch"`` (recovery compared with ``report``);
* ``stationary``: the same seed without drifts (false alarms per 100,000 events);
* ``warm start``: the first 10,000 live events after a history of the shortest
  length (``--warm-lengths``), drift-free, by learners restored from the checkpoint
  a backtest of the history wrote (``stream backtest --checkpoint-out``) and by
  fresh learners.

Per goal of the quality issue it prints one row: the measured values (per
seed), the target and met / missed. Everything is scored on the ground truth
(``stream.scoring.TruthScorer`` with ``trace``) and on each drift monitor's
error stream (recorded by wrapping the learner's ``Evaluation.drift``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from stream.backtest import run_backtest, write_checkpoint  # noqa: E402
from stream.config import Config, build_learners, load_config  # noqa: E402
from stream.demo import simulated_records  # noqa: E402
from stream.drift import ks, psi  # noqa: E402
from stream.scoring import TruthScorer  # noqa: E402
from stream.simulate import SimConfig, Simulation  # noqa: E402
from stream.state import read_any  # noqa: E402

LEARNERS = ("recommendation", "pricing", "risk")
#: Goal: a drift that raises the error is detected within this many of the learner's outcomes.
MAX_DELAY_OUTCOMES = 5_000
#: A drift "raised the error" when Welch's t of the error's block means (``RAISE_BLOCK``
#: outcomes each), ``MAX_DELAY_OUTCOMES`` after against as many before, exceeds ``RAISE_T``
#: (one-sided p ~ 0.001 on normal block means): a rise within the noise is no drift to catch.
RAISE_T = 3.0
RAISE_BLOCK = 100
#: Data drift: a feature is flagged when its PSI exceeds the alert rule's threshold
#: (configs/prometheus/alerts.yml), and counts as changed by the simulator when the KS
#: test against the drift-free run of the same seed gives p below this.
PSI_ALERT = 0.25
CHANGED_P = 1e-3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Recorder:
    """Stands in for a learner's drift monitor: forwards every error and
    records it with its event time, and every detection with the outcome count."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        #: The per-outcome error the detector watches: the squared error ``(y - p)^2``
        #: of a binary outcome (``block_cusum``'s signal), else the error reported.
        self.errors = array("d")
        self.ts = array("q")
        #: ``(outcomes so far, ts, direction)`` of every detection.
        self.found: list[tuple[int, int, str | None]] = []

    @property
    def detections(self) -> int:
        return int(self.inner.detections)

    @property
    def last_detection_ts(self) -> int | None:
        return self.inner.last_detection_ts  # type: ignore[no-any-return]

    @property
    def last_direction(self) -> str | None:
        return getattr(getattr(self.inner, "monitor", self.inner), "last_direction", None)

    def update(self, error: float, ts: int, outcome: tuple[bool, float] | None = None) -> bool:
        before = self.inner.detections
        out = bool(self.inner.update(error, ts) if outcome is None else self.inner.update(error, ts, outcome))
        self.errors.append(error if outcome is None else (float(outcome[0]) - outcome[1]) ** 2)
        self.ts.append(ts)
        if self.inner.detections != before:
            self.found.append((len(self.errors), ts, self.last_direction))
        return out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


def raise_t(errors: np.ndarray, n_d: int, span: int = MAX_DELAY_OUTCOMES, block: int = RAISE_BLOCK) -> float | None:
    """Whether the error rose at outcome ``n_d``: Welch's t of the block means
    (``block`` outcomes, near-normal) of the ``span`` outcomes after against the
    ``span`` before; None without two blocks on each side."""
    pre, post = errors[max(n_d - span, 0) : n_d], errors[n_d : n_d + span]
    if len(pre) < 2 * block or len(post) < 2 * block:
        return None
    a = pre[len(pre) % block :].reshape(-1, block).mean(axis=1)
    b = post[: len(post) // block * block].reshape(-1, block).mean(axis=1)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return float((b.mean() - a.mean()) / se) if se > 0 else None


def concept_drift_row(rec: Recorder, points: Sequence[Any], detections: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One learner's detections against its true drifts ``points``: per drift
    whether it raised the error (``raise_t``), the delay of the first detection
    within ``MAX_DELAY_OUTCOMES`` outcomes after it, and the recovery; the
    detections that follow no drift (false alarms); the rolling error curve."""
    errors = np.frombuffer(rec.errors, dtype=float) if len(rec.errors) else np.zeros(0)
    row: dict[str, Any] = {"outcomes": len(errors), "detections": len(rec.found),
                           "switches": getattr(rec.inner, "switches", None)}  # fmt: skip
    drift_rows = []
    near: set[int] = set()
    for d in points:
        n_d = bisect_left(rec.ts, d.ts)
        pre = errors[max(n_d - MAX_DELAY_OUTCOMES, 0) : n_d]
        post = errors[n_d : n_d + MAX_DELAY_OUTCOMES]
        ratio = float(post.mean() / pre.mean()) if len(pre) and len(post) and pre.mean() > 0 else None
        t = raise_t(errors, n_d)
        hit = None
        for k, (n, _ts, _direction) in enumerate(rec.found):
            if n > n_d and n - n_d <= MAX_DELAY_OUTCOMES:
                near.add(k)
                if hit is None:
                    hit = k
        drow: dict[str, Any] = {"kind": d.kind, "index": d.index, "outcome": n_d, "error_ratio": ratio,
                                "raise_t": t, "raised": t is not None and t > RAISE_T,
                                "outcomes_after": len(errors) - n_d, "delay_outcomes": None,
                                "delay_events": None}  # fmt: skip
        if hit is not None:
            drow["delay_outcomes"] = rec.found[hit][0] - n_d
            det_index = detections[hit]["index"] if hit < len(detections) else None
            if det_index is not None and d.index is not None:
                drow["delay_events"] = det_index - d.index
        # recovery: outcomes after the drift until the rolling error (500) is back
        # within 5 % of its mean over the outcomes before the drift
        if len(pre) and len(errors) > n_d + 500:
            roll = np.convolve(errors[n_d:], np.ones(500) / 500, mode="valid")
            back = np.flatnonzero(roll <= pre.mean() * 1.05)
            drow["recovery_outcomes"] = int(back[0]) + 500 if back.size else None
            drow["error_after_5000"] = float(post.mean())
            drow["error_before"] = float(pre.mean())
        drift_rows.append(drow)
    row["drifts"] = drift_rows
    row["false_alarms"] = len(rec.found) - len(near)
    row["detections_ts"] = [ts for _, ts, _ in rec.found]
    row["detections_outcome"] = [n for n, _, _ in rec.found]
    # a downsampled rolling error curve (for the reaction chart)
    if len(errors) >= 1000:
        w = max(len(errors) // 100, 200)
        roll = np.convolve(errors, np.ones(w) / w, mode="valid")
        step = max(len(roll) // 200, 1)
        row["error_curve"] = {"window": w, "outcome": list(range(w, w + len(roll), step)),
                              "ts": [int(rec.ts[i + w - 1]) for i in range(0, len(roll), step)],
                              "error": [round(float(v), 5) for v in roll[::step]]}  # fmt: skip
    return row


def quality_config(reaction: str = "report", base: Config | None = None) -> Config:
    config = base if base is not None else load_config(None)
    learners = {k: v for k, v in config.learners.items() if k in LEARNERS}
    if reaction != "report":
        for name, spec in learners.items():
            drift = getattr(spec, "drift", None)
            if drift is not None and not callable(drift):
                learners[name] = msgspec.structs.replace(  # type: ignore[type-var]
                    spec, drift=msgspec.structs.replace(drift, reaction=reaction)
                )
    return msgspec.structs.replace(config, learners=learners)


def auc(y: np.ndarray, s: np.ndarray) -> float | None:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_run(
    seed: int, events: int, reaction: str = "report", drifts: bool = True, tap: FeatureTap | None = None,
    base: Config | None = None,
) -> dict[str, Any]:
    """One backtest of the simulator's stream, scored; returns the figures of the run.
    ``tap``: also collects the input features (data drift); ``base``: the config (default: the packaged one)."""
    config = quality_config(reaction, base)
    sim = Simulation(SimConfig(seed=seed, events=events, drifts=drifts))
    learners = build_learners(config)
    recorders: dict[str, Recorder] = {}
    for learner in learners:
        ev = learner.evaluation  # type: ignore[attr-defined]
        recorders[learner.name] = ev.drift = Recorder(ev.drift)
    scorer = TruthScorer(sim.truth, trace=True)
    t0 = time.perf_counter()
    records = simulated_records(sim, config.input_topics())
    _, run = run_backtest(
        tap.tap(records) if tap is not None else records, config, total=events, learners=learners,
        truth=sim.truth, scorer=scorer, progress=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    truth = sim.truth
    # event index <-> event time, from the quality samples (every events/200 records)
    idx = np.array([0] + [p["index"] for p in run.timeline], dtype=float)
    tss = np.array([truth.start_ts] + [p["ts"] for p in run.timeline], dtype=float)
    tss = np.maximum.accumulate(tss)

    def ts_at(index: float) -> float:
        return float(np.interp(index, idx, tss))

    out: dict[str, Any] = {"seed": seed, "events": events, "reaction": reaction, "drifts": drifts,
                           "elapsed_s": round(elapsed, 1), "learners": {}, "end_ts": truth.end_ts,
                           "drift_points": [(d.kind, d.ts) for d in truth.drifts]}  # fmt: skip
    end_ts = truth.end_ts
    for learner in learners:
        name, kind = learner.name, getattr(learner, "kind", learner.name)
        rec = recorders[name]
        row: dict[str, Any] = concept_drift_row(rec, truth.drift_points(learner=kind) if drifts else [],
                                                run.detections[name])  # fmt: skip
        # -- scores against the ground truth
        tr = scorer.trace or {}
        last_tenth = truth.start_ts + 0.9 * (end_ts - truth.start_ts)
        hits = tr.get((name, "hit"))
        if hits:
            a = np.array(hits)
            tail = a[a[:, 0] >= last_tenth]
            row["taste_hit_rate"] = float(a[:, 1].mean())
            row["popularity_hit_rate"] = float(a[:, 2].mean())
            row["taste_hit_rate_last_tenth"] = float(tail[:, 1].mean())
            row["popularity_hit_rate_last_tenth"] = float(tail[:, 2].mean())
            row["hit_ratio_last_tenth"] = row["taste_hit_rate_last_tenth"] / row["popularity_hit_rate_last_tenth"]
        regrets = tr.get((name, "regret"))
        if regrets:
            a = np.array(regrets)
            row["regret"] = float(a[:, 1].mean())
            row["regret_current_price"] = float(a[:, 2].mean())
            # per tenth of the stream (event time): the learner's regret / the current price's
            edges = np.linspace(truth.start_ts, end_ts + 1, 11)
            bins = np.digitize(a[:, 0], edges) - 1
            row["regret_ratio_by_tenth"] = [
                round(float(a[bins == b, 1].mean() / a[bins == b, 2].mean()), 4) if (bins == b).any() else None
                for b in range(10)
            ]
            warm = getattr(learner, "spec", None)
            row["regret_last_tenth"] = float(a[bins == 9, 1].mean()) if (bins == 9).any() else None
            row["regret_current_last_tenth"] = float(a[bins == 9, 2].mean()) if (bins == 9).any() else None
            # after warm-up: from the first quote that is not the current price on
            moved = np.flatnonzero(np.abs(a[:, 1] - a[:, 2]) > 1e-12)
            if moved.size:
                after = a[moved[0] :]
                row["warmup_end_ts_share"] = float((after[0, 0] - truth.start_ts) / (end_ts - truth.start_ts))
                row["regret_after_warmup"] = float(after[:, 1].mean())
                row["regret_current_after_warmup"] = float(after[:, 2].mean())
            del warm
        frauds = tr.get((name, "fraud"))
        if frauds:
            a = np.array(frauds)
            y = a[:, 2] > 0.5
            row["fraud_auc"] = auc(y, a[:, 1])
            row["frauds"] = int(y.sum())
            pattern = [d for d in truth.drifts if d.kind == "fraud_pattern" and d.index is not None]
            if pattern:
                d = pattern[0]
                t10k = ts_at(d.index + 10_000)
                before = a[:, 0] < d.ts
                first = (a[:, 0] >= d.ts) & (a[:, 0] < t10k)
                later = a[:, 0] >= t10k
                row["fraud_auc_before_change"] = auc(y[before], a[before, 1])
                row["fraud_auc_first_10k_after_change"] = auc(y[first], a[first, 1])
                row["fraud_auc_after_10k_after_change"] = auc(y[later], a[later, 1]) if later.any() else None
        out["learners"][name] = row
    return out


# --------------------------------------------------------------------------- data drift


class FeatureTap:
    """Collects every numeric input field (``stream.metrics``' rule: int or float,
    not ``ts``, not ``*_id``) of the records going by, with the event time and
    whether the metrics' sampler (every ``sample_every``-th record) would take it."""

    def __init__(self, sample_every: int) -> None:
        self.sample_every = sample_every
        self.values: dict[tuple[str, str], tuple[array[int], array[float], array[int]]] = {}
        self._decode = msgspec.json.Decoder().decode
        self._n = 0

    def tap(self, records: Iterator[Any]) -> Iterator[Any]:
        for record in records:
            self._n += 1
            sampled = int(self._n % self.sample_every == 0)
            try:
                doc = self._decode(record.value())
            except (msgspec.DecodeError, UnicodeDecodeError):
                yield record
                continue
            if isinstance(doc, dict):
                ts, topic = record.timestamp()[1], record.topic()
                for name, v in doc.items():
                    if name == "ts" or name.endswith("_id") or type(v) not in (int, float) or not math.isfinite(v):
                        continue
                    got = self.values.get((topic, name))
                    if got is None:
                        got = self.values[(topic, name)] = (array("q"), array("d"), array("b"))
                    got[0].append(ts)
                    got[1].append(float(v))
                    got[2].append(sampled)
            yield record


def data_drift_rows(tap: FeatureTap, counterfactual: FeatureTap | None, points: Sequence[tuple[str, int]],
                    end_ts: int, window: int) -> list[dict[str, Any]]:  # fmt: skip
    """Per true drift and input feature: what the shipped data-drift score shows
    (PSI and KS of the first ``window`` sampled values after the drift against
    the ``window`` before, as a scrape then would) and whether the simulator
    changed the feature: a two-sample KS test (p < ``CHANGED_P``) of all its
    values after the drift (until the next drift) against the same period of
    the drift-free run of the same seed (``counterfactual``)."""
    from scipy.stats import ks_2samp

    rows = []
    ordered = sorted(points, key=lambda d: d[1])
    for k, (kind, at) in enumerate(ordered):
        until = ordered[k + 1][1] if k + 1 < len(ordered) else end_ts + 1
        for (topic, name), (ts_a, val_a, smp_a) in sorted(tap.values.items()):
            ts, val, smp = np.frombuffer(ts_a, np.int64), np.frombuffer(val_a), np.frombuffer(smp_a, np.int8)
            row: dict[str, Any] = {"drift": kind, "topic": topic, "feature": name}
            sampled_before = val[(smp == 1) & (ts < at)][-window:]
            sampled_after = val[(smp == 1) & (ts >= at) & (ts < until)][:window]
            if len(sampled_before) == window and len(sampled_after) == window:
                row["psi"], row["ks"] = psi(sampled_before, sampled_after), ks(sampled_before, sampled_after)
                row["flagged"] = row["psi"] > PSI_ALERT
            else:
                row["psi"] = row["ks"] = row["flagged"] = None  # the windows never fill: no score
            # the same score on all the records (no sampling), as with ``feature_sample_every = 1``
            before, after = val[ts < at][-window:], val[(ts >= at) & (ts < until)][:window]
            if len(before) == window and len(after) == window:
                row["psi_all"] = psi(before, after)
                row["flagged_all"] = row["psi_all"] > PSI_ALERT
            if counterfactual is not None and (topic, name) in counterfactual.values:
                c_ts_a, c_val_a, _ = counterfactual.values[(topic, name)]
                c_ts, c_val = np.frombuffer(c_ts_a, np.int64), np.frombuffer(c_val_a)
                mine = val[(ts >= at) & (ts < until)]
                theirs = c_val[(c_ts >= at) & (c_ts < until)]
                if len(mine) >= 20 and len(theirs) >= 20:
                    test = ks_2samp(mine, theirs)
                    row["truth_ks"], row["truth_p"] = float(test.statistic), float(test.pvalue)
                    row["changed"] = bool(test.pvalue < CHANGED_P)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- warm start

#: Live events scored after the history (the issue: "the first 10,000 live events").
WARM_LIVE = 10_000


def _truth_figures(scorer: TruthScorer) -> dict[str, dict[str, float | None]]:
    """Per learner, its ground-truth figures over everything ``scorer`` saw."""
    out: dict[str, dict[str, float | None]] = {}
    for (name, what), rows in (scorer.trace or {}).items():
        a = np.array(rows)
        if not len(a):
            continue
        row = out.setdefault(name, {})
        if what == "hit":
            row["hit"], row["popularity"] = float(a[:, 1].mean()), float(a[:, 2].mean())
        elif what == "regret":
            row["regret"], row["regret_current"] = float(a[:, 1].mean()), float(a[:, 2].mean())
        elif what == "fraud":
            row["auc"], row["frauds"] = auc(a[:, 2] > 0.5, a[:, 1]), float((a[:, 2] > 0.5).sum())
    return out


def warm_start_run(seed: int, history: int, tmp: Path) -> dict[str, Any]:
    """The first ``WARM_LIVE`` events after ``history`` events of the same (drift-free) world,
    scored on the ground truth: by the learners a backtest of the history left, written as a
    checkpoint and read back (the warm start), and by fresh learners (a cold start)."""
    import itertools

    config = quality_config()
    sim = Simulation(SimConfig(seed=seed, events=history + WARM_LIVE, drifts=False))
    records = simulated_records(sim, config.input_topics())
    _, past = run_backtest(itertools.islice(records, history), config, total=history, progress=False)
    path = write_checkpoint(tmp / f"warm-{seed}-{history}.ckpt", past.learners, {}, config)
    warm = read_any(path).learners
    live = list(records)
    out: dict[str, Any] = {"seed": seed, "history": history, "live": len(live), "checkpoint_bytes": path.stat().st_size}
    for start, learners in (("warm", warm), ("cold", None)):
        scorer = TruthScorer(sim.truth, trace=True)
        run_backtest(live, config, learners=learners, truth=sim.truth, scorer=scorer, progress=False)
        out[start] = _truth_figures(scorer)
    path.unlink()
    return out


def warm_start_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Rows of the warm-start goal: per history length, warm vs cold on the first live events."""
    lines = ["", f"WARM START: the first {WARM_LIVE:,} live events after a history, restored from a backtest's "
             "checkpoint (warm) vs fresh learners (cold)"]  # fmt: skip
    summary: dict[str, Any] = {}
    figures = (("recommendation", "hit", "taste hit-rate", 3), ("recommendation", "popularity", "popularity", 3),
               ("pricing", "regret", "regret", 4), ("pricing", "regret_current", "current price regret", 4),
               ("risk", "auc", "fraud AUC", 3), ("risk", "frauds", "frauds scored", 0))  # fmt: skip
    for history in sorted({r["history"] for r in rows}):
        runs = sorted((r for r in rows if r["history"] == history), key=lambda r: r["seed"])
        for learner, key, label, digits in figures:
            vals = {s: [r[s].get(learner, {}).get(key) for r in runs] for s in ("warm", "cold")}
            lines.append(f"  history {history:>7,} {learner:<15} {label:<21} warm "
                         f"{' / '.join(_fmt(v, digits) for v in vals['warm'])}  cold "
                         f"{' / '.join(_fmt(v, digits) for v in vals['cold'])}")  # fmt: skip
            summary[f"{history}/{learner}/{key}"] = vals
    return lines, summary


# --------------------------------------------------------------------------- the table


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _cell(values: Sequence[Any], digits: int = 3) -> str:
    return " / ".join(_fmt(v, digits) for v in values)


def drift_lines(by: dict[tuple[Any, ...], dict[str, Any]], seeds: Sequence[int], lengths: Sequence[int],
                summary: dict[str, Any]) -> list[str]:  # fmt: skip
    """The concept-drift, false-alarm and reaction rows (and their ``summary``)."""
    cell = _cell
    lines: list[str] = []
    lines.append("")
    lines.append(f"CONCEPT DRIFT (report): delay in the learner's outcomes (target <= {MAX_DELAY_OUTCOMES:,} when the "
                 f"drift raised the error: Welch t > {RAISE_T}), error ratio after/before, t")  # fmt: skip
    for name in LEARNERS:
        for n in lengths:
            rows = [by.get((s, n, "report", True), {}).get("learners", {}).get(name, {}) for s in seeds]
            for k, d in enumerate(rows[0].get("drifts", [])):
                drows = [r["drifts"][k] if r.get("drifts") else {} for r in rows]
                delays = [x.get("delay_outcomes") for x in drows]
                ratios = [x.get("error_ratio") for x in drows]
                ts = [x.get("raise_t") for x in drows]
                raised = [bool(x.get("raised")) for x in drows]
                ok = all((dl is not None) or not up for dl, up in zip(delays, raised, strict=True))
                lines.append(f"  {name:<15} {n:>7,} {d['kind']:<18} delay {cell(delays)}  error ratio {cell(ratios, 2)}"
                             f"  t {cell(ts, 1)} -> {'met' if ok else 'MISSED'}"
                             f" ({sum(raised)} of {len(raised)} raised the error)")  # fmt: skip
                summary.setdefault("drift_delay", {})[f"{name}/{n}"] = {"delays": delays, "error_ratio": ratios,
                                                                        "raise_t": ts, "raised": raised,
                                                                        "met": ok}  # fmt: skip
    lines.append("FALSE ALARMS per 100,000 stationary events (drift-free runs; target <= 1 per learner);"
                 " unmatched detections in the drifting runs")  # fmt: skip
    for name in LEARNERS:
        fa_total, ev_total, per = 0, 0, []
        for n in lengths:
            for s in seeds:
                r = by.get((s, n, "report", False))
                if r is None:
                    continue
                fa = r["learners"][name]["detections"]
                per.append(fa)
                fa_total += fa
                ev_total += n
        rate = 1e5 * fa_total / ev_total if ev_total else None
        unmatched = [by[(s, n, "report", True)]["learners"][name]["false_alarms"]
                     for n in lengths for s in seeds if (s, n, "report", True) in by]  # fmt: skip
        met = rate is not None and rate <= 1.0
        lines.append(f"  {name:<15} {fa_total} detections in {ev_total:,} stationary events = {_fmt(rate, 2)} "
                     f"per 100k (per run {per}); unmatched in drifting runs {unmatched} "
                     f"-> {'met' if met else 'MISSED'}")  # fmt: skip
        summary.setdefault("false_alarms_per_100k", {})[name] = {"rate": rate, "per_run": per,
                                                                 "unmatched_drifting": unmatched}  # fmt: skip
    lines += reaction_lines(by, seeds, lengths, summary)
    lines += data_drift_lines(by, seeds, lengths, summary)
    return lines


#: Outcomes after a drift at which the reaction curves are read.
CURVE_AT = (0, 2_000, 4_000, 6_000, 8_000, 10_000, 15_000)


def curve_after(row: dict[str, Any], drift: dict[str, Any]) -> list[float | None]:
    """The learner's rolling error (``error_curve``: over its last ``window`` outcomes)
    ``CURVE_AT`` outcomes after the drift, relative to its mean before the drift."""
    curve, before = row.get("error_curve"), drift.get("error_before")
    if not curve or not before:
        return [None] * len(CURVE_AT)
    xs, ys = np.array(curve["outcome"]), np.array(curve["error"])
    out: list[float | None] = []
    for dx in CURVE_AT:
        at = drift["outcome"] + dx + curve["window"] // 2  # the window centred on the point
        out.append(float(np.interp(at, xs, ys) / before) if xs[0] <= at <= xs[-1] else None)
    return out


def reaction_lines(by: dict[tuple[Any, ...], dict[str, Any]], seeds: Sequence[int], lengths: Sequence[int],
                   summary: dict[str, Any]) -> list[str]:  # fmt: skip
    """``switch`` against ``report`` after each learner's first true drift: the mean error
    over the 5,000 outcomes after it, the recovery, and the curve (``curve_after``, mean of the seeds)."""
    cell = _cell
    lines = ["", "REACTION: switch vs report after the drift: mean error over its 5,000 outcomes; recovery (outcomes "
                 "until the rolling error is within 5 % of before); curve = rolling error / before at "
                 f"+{', +'.join(f'{x:,}' for x in CURVE_AT)} outcomes (mean of the seeds)"]  # fmt: skip
    for name in LEARNERS:
        for n in lengths:
            rep = [by.get((s, n, "report", True), {}).get("learners", {}).get(name, {}) for s in seeds]
            sw = [by.get((s, n, "switch", True), {}).get("learners", {}).get(name, {}) for s in seeds]
            if not any(sw):
                continue
            first = [(r["drifts"][0] if r.get("drifts") else {}) for r in rep]
            first_sw = [(r["drifts"][0] if r.get("drifts") else {}) for r in sw]
            e_rep = [d.get("error_after_5000") for d in first]
            e_sw = [d.get("error_after_5000") for d in first_sw]
            r_rep = [d.get("recovery_outcomes") for d in first]
            r_sw = [d.get("recovery_outcomes") for d in first_sw]
            sws = [r.get("switches") for r in sw]

            def mean_curve(rows: list[dict[str, Any]], drifts: list[dict[str, Any]]) -> list[float | None]:
                curves = [curve_after(r, d) for r, d in zip(rows, drifts, strict=True) if d]
                cols = [[v for v in col if v is not None] for col in zip(*curves, strict=True)] if curves else []
                return [float(np.mean(c)) if c else None for c in cols]

            c_rep, c_sw = mean_curve(rep, first), mean_curve(sw, first_sw)
            lines.append(f"  {name:<15} {n:>7,} error report {cell(e_rep)} switch {cell(e_sw)}; recovery report "
                         f"{cell(r_rep)} switch {cell(r_sw)}; switches {sws}")  # fmt: skip
            lines.append(f"  {'':<15} {'':>7} curve report {cell(c_rep, 2)}")
            lines.append(f"  {'':<15} {'':>7} curve switch {cell(c_sw, 2)}")
            summary.setdefault("reaction", {})[f"{name}/{n}"] = {
                "error_report": e_rep, "error_switch": e_sw, "recovery_report": r_rep, "recovery_switch": r_sw,
                "switches": sws, "curve_at": list(CURVE_AT), "curve_report": c_rep, "curve_switch": c_sw,
            }  # fmt: skip
    return lines


def data_drift_lines(by: dict[tuple[Any, ...], dict[str, Any]], seeds: Sequence[int], lengths: Sequence[int],
                     summary: dict[str, Any]) -> list[str]:  # fmt: skip
    """Per length and true drift: the features the simulator changed (KS against the
    drift-free twin), those the shipped score flagged (PSI > ``PSI_ALERT``), and the
    twin's flags at the same points (false)."""
    lines = ["", f"DATA DRIFT: features changed by the drift (KS vs the drift-free run, p < {CHANGED_P}) and flagged "
                 f"(PSI > {PSI_ALERT}; as shipped: every 16th record, windows of 1,000 / on every record)"]  # fmt: skip
    for n in lengths:
        for s in seeds:
            rows = by.get((s, n, "report", True), {}).get("data_drift")
            if not rows:
                continue
            twin = {(r["drift"], r["topic"], r["feature"]): r for r in by.get((s, n, "report", False), {}).get(
                "data_drift", [])}  # fmt: skip
            for kind in dict.fromkeys(r["drift"] for r in rows):
                mine = [r for r in rows if r["drift"] == kind]
                name = [f"{r['topic']}.{r['feature']}" for r in mine]
                changed = {x for x, r in zip(name, mine, strict=True) if r.get("changed")}
                flagged = {x for x, r in zip(name, mine, strict=True) if r.get("flagged")}
                flagged_all = {x for x, r in zip(name, mine, strict=True) if r.get("flagged_all")}
                unscored = {x for x, r in zip(name, mine, strict=True) if r.get("psi") is None}
                false_twin = {x for x, r in zip(name, mine, strict=True)
                              if twin.get((kind, r["topic"], r["feature"]), {}).get("flagged")}  # fmt: skip
                ok = flagged == changed and not false_twin
                lines.append(f"  {n:>7,} seed {s} {kind:<18} changed {sorted(changed) or '-'}; "
                             f"flagged {sorted(flagged) or '-'} (every record: {sorted(flagged_all) or '-'}); "
                             f"drift-free twin flagged {sorted(false_twin) or '-'}; no score (windows never full) "
                             f"{len(unscored)} of {len(name)} -> {'met' if ok else 'MISSED'}")  # fmt: skip
                summary.setdefault("data_drift", {})[f"{n}/{s}/{kind}"] = {
                    "changed": sorted(changed), "flagged": sorted(flagged), "flagged_every_record": sorted(flagged_all),
                    "twin_flagged": sorted(false_twin), "unscored": sorted(unscored), "met": ok,
                }  # fmt: skip
    return lines


def table(runs: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The rows per goal (text) and a summary (JSON)."""
    by = {(r["seed"], r["events"], r["reaction"], r["drifts"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    lengths = sorted({r["events"] for r in runs})
    lines: list[str] = []
    summary: dict[str, Any] = {}

    def cell(values: list[Any], digits: int = 3) -> str:
        return " / ".join(_fmt(v, digits) for v in values)

    lines.append(f"quality bench: seeds {seeds}, lengths {lengths}; values per seed ({' / '.join(map(str, seeds))})")
    lines += drift_lines(by, seeds, lengths, summary)
    # 3. recommendation
    lines.append("")
    lines.append(
        "RECOMMENDATION: taste hit-rate / popularity's, last tenth of the run (target 1.5x at 30k, 2x at 300k)"
    )
    for n in lengths:
        rows = [by.get((s, n, "report", True), {}).get("learners", {}).get("recommendation", {}) for s in seeds]
        ratio = [r.get("hit_ratio_last_tenth") for r in rows]
        hit = [r.get("taste_hit_rate_last_tenth") for r in rows]
        pop = [r.get("popularity_hit_rate_last_tenth") for r in rows]
        target = 1.5 if n < 100_000 else 2.0
        met = all(x is not None and x >= target for x in ratio)
        lines.append(f"  {n:>7,} hit {cell(hit)} popularity {cell(pop)} ratio {cell(ratio, 2)} (target {target}x) "
                     f"-> {'met' if met else 'MISSED'}")  # fmt: skip
        summary.setdefault("recommendation", {})[str(n)] = {"hit": hit, "popularity": pop, "ratio": ratio, "met": met}
    # 4. pricing
    lines.append("")
    lines.append(
        "PRICING: regret after warm-up vs keeping the current price (target below; <= 0.5x at 300k, last tenth)"
    )
    for n in lengths:
        rows = [by.get((s, n, "report", True), {}).get("learners", {}).get("pricing", {}) for s in seeds]
        mine = [r.get("regret_after_warmup") for r in rows]
        cur = [r.get("regret_current_after_warmup") for r in rows]
        tenths = [r.get("regret_ratio_by_tenth") for r in rows]
        last = [(r.get("regret_last_tenth") or math.nan) / (r.get("regret_current_last_tenth") or math.nan)
                for r in rows]  # fmt: skip
        worst = [max((x for x in (t or [])[1:] if x is not None), default=None) for t in tenths]
        met = all(x is not None and x < 1.0 for x in worst) and (n < 100_000 or all(x <= 0.5 for x in last))
        lines.append(f"  {n:>7,} regret {cell(mine, 4)} current price {cell(cur, 4)}; worst tenth ratio "
                     f"{cell(worst, 2)}; last tenth ratio {cell(last, 2)} -> {'met' if met else 'MISSED'}")  # fmt: skip
        summary.setdefault("pricing", {})[str(n)] = {"regret": mine, "current": cur, "ratio_by_tenth": tenths,
                                                     "last_tenth_ratio": last, "met": met}  # fmt: skip
    # 5. risk
    lines.append("")
    lines.append("RISK: ROC AUC vs the true frauds (target >= 0.95 by 30k; >= 0.95 within 10k events of the change)")
    for n in lengths:
        rows = [by.get((s, n, "report", True), {}).get("learners", {}).get("risk", {}) for s in seeds]
        whole = [r.get("fraud_auc") for r in rows]
        frauds = [r.get("frauds") for r in rows]
        before = [r.get("fraud_auc_before_change") for r in rows]
        first = [r.get("fraud_auc_first_10k_after_change") for r in rows]
        later = [r.get("fraud_auc_after_10k_after_change") for r in rows]
        met = all(x is not None and x >= 0.95 for x in whole) and (
            n < 100_000 or all(x is not None and x >= 0.95 for x in later)
        )
        lines.append(f"  {n:>7,} AUC whole run {cell(whole)} (frauds {frauds}); before the change {cell(before)}; "
                     f"first 10k events after {cell(first)}; from 10k after on {cell(later)} -> "
                     f"{'met' if met else 'MISSED'}")  # fmt: skip
        summary.setdefault("risk", {})[str(n)] = {"auc": whole, "frauds": frauds, "before": before,
                                                  "first_10k_after": first, "after_10k": later, "met": met}  # fmt: skip
    return lines, summary


def plot(runs: Sequence[dict[str, Any]], path: Path) -> str | None:
    """Rolling error of each learner, report vs switch, true drift and detections marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed"
    longest = max(r["events"] for r in runs)
    seed = min(r["seed"] for r in runs)
    pick = {r["reaction"]: r for r in runs if r["events"] == longest and r["seed"] == seed and r["drifts"]}
    if not pick:
        return "no runs to plot"
    fig, axes = plt.subplots(len(LEARNERS), 1, figsize=(10, 2.8 * len(LEARNERS)), squeeze=False)
    for ax, name in zip(axes[:, 0], LEARNERS, strict=True):
        for reaction, r in sorted(pick.items()):
            row = r["learners"].get(name, {})
            curve = row.get("error_curve")
            if curve:
                ax.plot(curve["outcome"], curve["error"], label=f"{reaction} (rolling {curve['window']})", lw=1.1)
            for d in row.get("drifts", []):
                ax.axvline(d["outcome"], color="green", lw=1.5, alpha=0.6)
        ax.set_title(f"{name}: rolling error per outcome, seed {seed}, {longest:,} events (green: true drift)",
                     fontsize=9, loc="left")  # fmt: skip
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("learner outcomes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def save_run(runs_dir: Path, run: dict[str, Any]) -> None:
    runs_dir.mkdir(parents=True, exist_ok=True)
    name = f"run-{run['seed']}-{run['events']}-{run['reaction']}-{'drifts' if run['drifts'] else 'stationary'}.json"
    (runs_dir / name).write_text(json.dumps(run, default=float) + "\n")


def load_runs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Runs from saved ``--json`` outputs and ``--runs-dir`` directories (a directory's runs override)."""
    runs: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in paths:
        found = ([json.loads(f.read_text()) for f in sorted(path.glob("run-*.json"))] if path.is_dir()
                 else json.loads(path.read_text())["quality"]["runs"])  # fmt: skip
        for r in found:
            runs[(r["seed"], r["events"], r["reaction"], r["drifts"])] = r
    return list(runs.values())


def bench_quality(seeds: Sequence[int], lengths: Sequence[int], *, reactions: Sequence[str] = ("report", "switch"),
                  stationary: bool = True, plot_path: Path | None = None,
                  warm_start: bool = True, runs_dir: Path | None = None,
                  warm_lengths: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every run of the plan (``runs_dir``: each also saved there as it completes, so a
    long bench that stops keeps what it measured; ``--table-from`` reads them back).
    The warm-start rows use histories of ``warm_lengths`` (default: the shortest length)."""
    runs = []
    base = load_config(None)  # once: a config file edited during a long bench must not change its runs
    metrics = base.metrics
    for n in lengths:
        for s in seeds:
            plan = [(r, True) for r in reactions] + ([("report", False)] if stationary else [])
            taps: dict[bool, FeatureTap] = {}
            for reaction, drifts in plan:
                tap = FeatureTap(metrics.feature_sample_every) if reaction == "report" else None
                r = one_run(s, n, reaction, drifts, tap=tap, base=base)
                log(f"quality: seed {s}, {n:,} events, {reaction}{'' if drifts else ', no drifts'}: {r['elapsed_s']} s")
                runs.append(r)
                if runs_dir is not None:
                    save_run(runs_dir, r)
                if tap is not None:
                    taps[drifts] = tap
                    if drifts:
                        drifting = r
            if True in taps:
                # the drift run against its drift-free twin (truth); the twin alone at the same points (false flags)
                points, end = drifting["drift_points"], drifting["end_ts"]
                drifting["data_drift"] = data_drift_rows(taps[True], taps.get(False), points, end,
                                                         metrics.feature_window)  # fmt: skip
                if False in taps:
                    twin = next(x for x in runs if (x["seed"], x["events"], x["drifts"]) == (s, n, False))
                    twin["data_drift"] = data_drift_rows(taps[False], None, points, end, metrics.feature_window)
                if runs_dir is not None:
                    save_run(runs_dir, drifting)
                    if False in taps:
                        save_run(runs_dir, twin)
    lines, summary = table(runs)
    warm_rows: list[dict[str, Any]] = []
    if warm_start:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for n in warm_lengths if warm_lengths is not None else [min(lengths)]:
                for s in seeds:
                    t0 = time.perf_counter()
                    warm_rows.append(warm_start_run(s, n, Path(tmp)))
                    log(f"quality: warm start, seed {s}, history {n:,}: {time.perf_counter() - t0:.1f} s")
        warm_lines, summary["warm_start"] = warm_start_table(warm_rows)
        lines += warm_lines
    for line in lines:
        log(line)
    out: dict[str, Any] = {"quality": {"seeds": list(seeds), "lengths": list(lengths), "table": lines,
                                       "summary": summary, "runs": runs, "warm_start": warm_rows}}  # fmt: skip
    if plot_path is not None:
        why = plot(runs, plot_path)
        out["quality"]["chart"] = str(plot_path) if why is None else why
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lengths", default="30000,300000")
    p.add_argument("--reactions", default="report,switch")
    p.add_argument("--no-stationary", action="store_true", help="skip the drift-free runs (false alarms)")
    p.add_argument("--no-warm-start", action="store_true", help="skip the warm-start rows")
    p.add_argument("--warm-lengths", metavar="N,N",
                   help="histories of the warm-start rows (default: the shortest of --lengths)")  # fmt: skip
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--runs-dir", type=Path, help="also save each run there as it completes")
    p.add_argument("--table-from", type=Path, nargs="+",
                   help="print the table of saved --json outputs and --runs-dir directories (no runs)")  # fmt: skip
    args = p.parse_args(argv)
    if args.table_from:
        runs = load_runs(args.table_from)
        lines, summary = table(runs)
        print("\n".join(lines))
        if args.json:
            saved = {"seeds": sorted({r["seed"] for r in runs}), "lengths": sorted({r["events"] for r in runs}),
                     "table": lines, "summary": summary, "runs": runs}  # fmt: skip
            args.json.write_text(json.dumps({"quality": saved}, indent=1, default=float) + "\n")
        return 0
    warm = [int(x) for x in args.warm_lengths.split(",")] if args.warm_lengths else None
    fig = bench_quality([int(x) for x in args.seeds.split(",")], [int(x) for x in args.lengths.split(",")],
                        reactions=args.reactions.split(","), stationary=not args.no_stationary,
                        plot_path=args.plot, warm_start=not args.no_warm_start, runs_dir=args.runs_dir,
                        warm_lengths=warm)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
