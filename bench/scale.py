"""Scale-out, measured broker-less: the same stream split into P tasks, with and without model sync.

A task is one partition number of the co-partitioned inputs: clicks and purchases go to the task of
their key (the user), prices to every task (a global table: every task needs every price), fraud labels
to the task of the purchase they answer (an order -> task table, what a repartition topic does). Each task
runs its own learners through its own ``Pipeline``; one ground-truth scorer sees every task's outputs.

    .venv/bin/python bench/scale.py [--events 30000] [--seeds 0,1,2] [--tasks 4] [--sync-every 500]

Prints, per learner, the ground-truth quality of one model that sees everything, of P tasks without
sync, and of P tasks whose linear parameters are merged (``stream.sync.ModelSync``) every
``--sync-every`` events per task, with the relative gap to the single model; then the throughput of the
P tasks run by 2 processes against 1 (ratios side by side in one run; the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
import zlib
from collections.abc import Sequence
from typing import Any

from stream.config import Config, build_learners, load_config
from stream.demo import simulated_records
from stream.pipeline import Pipeline, Tally
from stream.recording import RecordedMessage
from stream.scoring import TruthScorer
from stream.simulate import SimConfig, Simulation
from stream.sync_topic import LocalSync, encode_params

#: What each learner is scored on (the TruthScorer's figure) and whether higher is better.
FIGURES = {"pricing": ("pricing_regret", False), "risk": ("fraud_auc", True),
           "recommendation": ("taste_hit_rate", True)}  # fmt: skip
LEARNERS = ("pricing", "risk", "recommendation")


class _Null:
    def produce(self, topic: str, key: Any, value: Any, headers: Any = None) -> None:
        pass


def route(records: Sequence[RecordedMessage], tasks: int, config: Config) -> list[list[RecordedMessage]]:
    """Split the records into per-task streams (see the module doc)."""
    topics = config.input_topics()
    order_task: dict[str, int] = {}
    out: list[list[RecordedMessage]] = [[] for _ in range(tasks)]
    for r in records:
        topic = r.topic()
        if topic == topics["prices"]:
            for stream in out:
                stream.append(r)
            continue
        if topic == topics["fraud_labels"]:
            order = json.loads(r.value() or b"{}").get("order_id", "")
            out[order_task.get(order, zlib.crc32(order.encode()) % tasks)].append(r)
            continue
        task = zlib.crc32(r.key() or b"") % tasks
        if topic == topics["purchases"]:
            order_task[json.loads(r.value() or b"{}").get("order_id", "")] = task
        out[task].append(r)
    return out


def run(
    config: Config, records: list[RecordedMessage], truth: Any, tasks: int, sync_every: int | None
) -> dict[str, Any]:
    """Quality of ``tasks`` tasks over ``records`` (interleaved in event-time order, as live), with the
    cost of model sync (``stream.sync_topic.LocalSync``) when ``sync_every`` is set."""
    scorer = TruthScorer(truth)
    pipes, sets = [], {}
    for k in range(tasks):
        learners = [lr for lr in build_learners(config) if lr.name in LEARNERS]
        sets[k] = learners
        pipes.append(Pipeline(learners, scorer.wrap_sink(_Null()), contract_topics=config.input_topics(),
                              dead_letter_topic="dead", observer=Tally(scorer)))  # fmt: skip
    # Every sync_every events per task, on average; never on the clock (the bench must not depend on speed).
    sync = LocalSync(sync_every * tasks, float("inf"), config.sync.mode) if sync_every else None
    streams = route(records, tasks, config) if tasks > 1 else [records]
    # Event-time order across tasks: what P instances running side by side do.
    merged = sorted(((r.timestamp()[1], n, k, r) for k, s in enumerate(streams) for n, r in enumerate(s)),
                    key=lambda x: (x[0], x[2], x[1]))  # fmt: skip
    sent = 0
    for _, _, k, r in merged:
        pipes[k].process(r)
        if sync is not None:
            before = sync.merges
            sync.tick(sets, 1)
            if sync.merges != before:
                # What a TopicSync would publish: every task's contribution, per learner.
                sent += sum(len(encode_params(m.contribution(t))) for m in sync.mergers.values() for t in sets)
    results = scorer.results()
    out: dict[str, Any] = {name: results.get(name, {}).get(FIGURES[name][0]) for name in LEARNERS}
    if sync is not None and sync.merges:
        out["merges"] = sync.merges
        out["ms_per_merge"] = 1000 * sync.merge_seconds / sync.merges
        out["bytes_per_merge"] = sent / sync.merges
    return out


def _work(args: tuple[Config, list[list[RecordedMessage]]]) -> float:
    config, streams = args
    started = time.process_time()
    for stream in streams:
        pipe = Pipeline([lr for lr in build_learners(config) if lr.name in LEARNERS], _Null(),
                        contract_topics=config.input_topics(), dead_letter_topic="dead")  # fmt: skip
        for r in stream:
            pipe.process(r)
    return time.process_time() - started


def throughput(config: Config, records: list[RecordedMessage], tasks: int) -> dict[str, float]:
    """Wall time of the ``tasks`` task streams run by 1 process and by 2, side by side."""
    streams = route(records, tasks, config)
    events = sum(len(s) for s in streams)
    out: dict[str, float] = {}
    ctx = mp.get_context("fork")
    for procs in (1, 2):
        shares = [streams[i::procs] for i in range(procs)]
        started = time.perf_counter()
        with ctx.Pool(procs) as pool:
            pool.map(_work, [(config, share) for share in shares])
        out[f"events_per_s_{procs}_process"] = events / (time.perf_counter() - started)
    out["ratio_2_vs_1"] = out["events_per_s_2_process"] / out["events_per_s_1_process"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--sync-every", type=int, default=500)
    args = p.parse_args()
    config = load_config(None)
    rows: dict[str, dict[str, list[float | None]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        sim = Simulation(SimConfig(seed=seed, events=args.events))
        records = list(simulated_records(sim, config.input_topics()))
        n = args.tasks
        variants = {"one model": run(config, records, sim.truth, 1, None),
                    f"{n} tasks, no sync": run(config, records, sim.truth, n, None),
                    f"{n} tasks, sync": run(config, records, sim.truth, n, args.sync_every)}  # fmt: skip
        for variant, figures in variants.items():
            for name in LEARNERS:
                rows.setdefault(name, {}).setdefault(variant, []).append(figures[name])
        print(f"seed {seed}: {json.dumps(variants)}", flush=True)
    print(f"\n{args.events:,} events, seeds {args.seeds}; sync every {args.sync_every} events per task")
    for name, variants in rows.items():
        figure, higher = FIGURES[name]
        base = variants["one model"]
        print(f"{name} ({figure}, {'higher' if higher else 'lower'} is better)")
        for variant, values in variants.items():
            gaps = [(v - b) / abs(b) if v is not None and b else None for v, b in zip(values, base, strict=True)]
            shown = ", ".join(f"{v:.4f}" if v is not None else "n/a" for v in values)
            gap = ", ".join(f"{g:+.1%}" if g is not None else "n/a" for g in gaps)
            print(f"  {variant:<22} {shown}   vs one model: {gap}")
    records = list(simulated_records(Simulation(SimConfig(seed=0, events=args.events)), config.input_topics()))
    print("\nthroughput:", json.dumps(throughput(config, records, args.tasks)))


if __name__ == "__main__":
    main()
