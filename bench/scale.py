"""Scale-out, measured broker-less: the same stream split into P tasks, with and without model sync.

A task is one partition number of the co-partitioned inputs: clicks and purchases go to the task of
their key (the user), prices to every task (a global table: every task needs every price), fraud labels
to the task of the purchase they answer (an order -> task table, what a repartition topic does). Each task
runs its own learners through its own ``Pipeline``; one ground-truth scorer sees every task's outputs.

    .venv/bin/python bench/scale.py [--lengths 30000,100000] [--seeds 0,1,2] [--tasks 4] [--sync-every 100]

Prints, per learner, seed and length, the ground-truth quality of one model that sees everything, of P
tasks without sync, and of P tasks whose global parameters are merged (``stream.sync_topic.LocalSync``)
every ``--sync-every`` events per task, with the relative gap to the single model; the time and size of
a merge; the throughput of the P tasks run by 2 processes against 1 (ratios side by side in one run; the
machine is shared and noisy); and a projection for 4, 8 and 16 instances. ``bench/run.py`` runs it as
its ``scale`` section.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
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
    sent, merge_cpu = 0, 0.0
    for _, _, k, r in merged:
        pipes[k].process(r)
        if sync is not None:
            before, cpu = sync.merges, time.process_time()
            sync.tick(sets, 1)
            if sync.merges != before:
                merge_cpu += time.process_time() - cpu
                # What a TopicSync would publish: every task's contribution, per learner.
                sent += sum(len(encode_params(m.contribution(t))) for m in sync.mergers.values() for t in sets)
    results = scorer.results()
    out: dict[str, Any] = {name: results.get(name, {}).get(FIGURES[name][0]) for name in LEARNERS}
    if sync is not None and sync.merges:
        out["merges"] = sync.merges
        out["ms_per_merge"] = 1000 * sync.merge_seconds / sync.merges
        out["cpu_ms_per_merge"] = 1000 * merge_cpu / sync.merges  # the machine's load left out
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
    cpu: dict[int, list[float]] = {}
    for procs in (1, 2):
        shares = [streams[i::procs] for i in range(procs)]
        started = time.perf_counter()
        with ctx.Pool(procs) as pool:
            cpu[procs] = pool.map(_work, [(config, share) for share in shares])
        out[f"events_per_s_{procs}_process"] = events / (time.perf_counter() - started)
    out["ratio_2_vs_1"] = out["events_per_s_2_process"] / out["events_per_s_1_process"]
    # On a machine shared with other work the wall-clock ratio says how busy the machine was; the CPU
    # seconds of each process say what two free cores would give (the slower process decides).
    out["cpu_s_1_process"] = cpu[1][0]
    out["cpu_s_2_processes"] = cpu[2]  # type: ignore[assignment]
    out["ratio_2_vs_1_on_free_cores"] = cpu[1][0] / max(cpu[2])
    out["events_per_cpu_s_1_process"] = events / cpu[1][0]
    return out


def projection(events_per_s: float, tasks: int, ms_per_merge: float, bytes_per_merge: float,
               every_events: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """N instances, one task each, from what one process measured on ``tasks`` tasks: the per-event
    cost, and a merge whose cost and size grow with the tasks merged (each instance updates its own
    task, then sums every task's contribution: taken as linear in the tasks, an upper bound). An
    instance merges every ``every_events`` events; it writes one contribution, reads the N - 1 others.
    The broker's own cost is not in it (it runs elsewhere in a deployment)."""
    per_event_s = 1.0 / events_per_s  # the P tasks share one core: the cost of one event, whichever task
    merge_s_per_task = ms_per_merge / 1000 / tasks
    contribution = bytes_per_merge / tasks
    out: dict[str, dict[str, float]] = {}
    for n in (4, 8, 16):
        per_instance = 1.0 / (per_event_s + merge_s_per_task * n / every_events)
        merges_per_s = per_instance / every_events
        out[str(n)] = {
            "events_per_s": n * per_instance,
            "speed_up_vs_1": n * per_instance * per_event_s,
            "sync_share_of_cpu": merge_s_per_task * n * merges_per_s,
            "sync_bytes_read_per_instance_per_s": (n - 1) * contribution * merges_per_s,
            "sync_bytes_written_per_s": n * contribution * merges_per_s,
        }
    return out


def _gap(value: float | None, base: float | None) -> float | None:
    return (value - base) / abs(base) if value is not None and base else None


def bench_scale(seeds: Sequence[int], lengths: Sequence[int], tasks: int, sync_every: int,
                log: Any = print) -> dict[str, Any]:  # fmt: skip
    """The issue's Measure section in one run: quality of one model, of ``tasks`` tasks without and
    with sync, per seed and length, with the relative gaps; the cost of a merge; 2 processes vs 1; the
    projection for 4, 8 and 16 instances."""
    config = load_config(None)
    runs: list[dict[str, Any]] = []
    for events in lengths:
        for seed in seeds:
            sim = Simulation(SimConfig(seed=seed, events=events))
            records = list(simulated_records(sim, config.input_topics()))
            variants = {"one model": run(config, records, sim.truth, 1, None),
                        "no sync": run(config, records, sim.truth, tasks, None),
                        "sync": run(config, records, sim.truth, tasks, sync_every)}  # fmt: skip
            row: dict[str, Any] = {"seed": seed, "events": events, "variants": variants}
            for name in LEARNERS:
                base = variants["one model"][name]
                row[f"{name}_gap_no_sync"] = _gap(variants["no sync"][name], base)
                row[f"{name}_gap_sync"] = _gap(variants["sync"][name], base)
            runs.append(row)
            log(f"scale seed {seed}, {events:,} events: {json.dumps(row)}")
    records = list(simulated_records(Simulation(SimConfig(seed=0, events=lengths[0])), config.input_topics()))
    speed = throughput(config, records, tasks)
    log(f"scale throughput: {json.dumps(speed)}")
    syncs = [r["variants"]["sync"] for r in runs if r["events"] == lengths[0]]
    ms = statistics.median(v["cpu_ms_per_merge"] for v in syncs)
    size = statistics.median(v["bytes_per_merge"] for v in syncs)
    return {"scale_tasks": tasks, "scale_sync_every_events_per_task": sync_every, "scale_runs": runs,
            "scale_cpu_ms_per_merge": ms, "scale_bytes_per_merge": size, "scale_throughput": speed,
            "scale_projection": projection(speed["events_per_cpu_s_1_process"], tasks, ms, size,
                                           config.sync.every_events)}  # fmt: skip


def report(fig: dict[str, Any]) -> str:
    """The figures as the Markdown rows of bench/README.md (scale section)."""
    lines = ["| learner (figure) | events | seed | one model | no sync | gap | sync | gap |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in LEARNERS:
        figure, higher = FIGURES[name]
        for r in fig["scale_runs"]:
            v = r["variants"]
            cells = [f"{v[k][name]:.4f}" if v[k][name] is not None else "n/a" for k in ("one model", "no sync", "sync")]
            gaps = [f"{g:+.1%}" if g is not None else "n/a" for g in (r[f"{name}_gap_no_sync"], r[f"{name}_gap_sync"])]
            lines.append(f"| {name} ({figure}, {'higher' if higher else 'lower'} better) | {r['events']:,} | "
                         f"{r['seed']} | {cells[0]} | {cells[1]} | {gaps[0]} | {cells[2]} | {gaps[1]} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="30000", help="stream lengths, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--sync-every", type=int, default=100, help="events per task between merges")
    p.add_argument("--json", help="also write the figures as JSON here")
    args = p.parse_args()
    fig = bench_scale([int(s) for s in args.seeds.split(",")], [int(n) for n in args.lengths.split(",")],
                      args.tasks, args.sync_every)  # fmt: skip
    print(report(fig))
    print(json.dumps({k: v for k, v in fig.items() if k != "scale_runs"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
