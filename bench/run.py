"""The benchmark suite: how fast, how close to the limit, how the cost grows.

    .venv/bin/python bench/run.py [--events N] [--json PATH] [--bootstrap-servers H:P] [--skip ...]

Every figure that matters is a ratio measured side by side in the same run,
because absolute times on shared machines are noisy:

1. limit     the learners alone on pre-decoded events in a tight loop (River's cost)
2. backtest  decode + learners + metrics + encoded outputs, no broker; ratio to (1)
3. kafka     ``stream run`` on one core, from start to the last committed offset, with
             the inputs preloaded; ratio to (1); and raw confluent-kafka consumption
4. latency   events produced at half the measured maximum rate: p50/p99/p99.9 from
             produced to prediction received; and, in the same run, one plain
             produce -> consume hop of the inputs (the broker's share), and the
             pipeline's own share: input consumed -> its outputs acknowledged
             (``stream_pipeline_latency_seconds`` read from ``/metrics``)
5. growth    events/s and resident memory as distinct users and the catalog grow
6. checkpoint time and size of a checkpoint, and time to restore, as the model grows
7. flood     an identity flood: every user, item, order, device (and, at a set rate,
             category) is new; RSS sampled along the run must level off once the
             bounds are reached (growth per event, last half vs the first stretch)
8. demand    the demand learner on the simulator's demand world: WAPE vs the seasonal
             naive baseline, interval coverage, stock-out warnings, cost per event
9. ranking   the ranking learner (search and ads) on simulated requests, per seed: NDCG@10
             on the true relevance of our order vs the engine's, ads expected revenue per
             request vs ranking by bid alone, the replay estimate of the top ad slot, and
             the cost per request (scoring 50 candidates; everything the learner does)
10. quality  recommendation, pricing and risk against the simulator's ground truth
             and simple baselines, drift detections against the true drifts
             (bench/quality.py: seeds x lengths, report / switch / drift-free runs)
11. peers    one job (StandardScaler | LinearRegression over purchase events in 3
             partitions, one JSON prediction per event) run by ``stream run``, a plain
             confluent-kafka loop, Quix Streams and Bytewax (``.[bench]`` extra) against
             the same broker in the same run: steady events/s, CPU per event, ratios
             (see bench/peers.py)
12. scale    scale-out, broker-less: the same stream split into P tasks, quality of one
             model vs P tasks without and with model sync per seed and length, the time
             and size of a merge, P tasks by 2 processes vs 1, and a projection for 4, 8
             and 16 instances (see bench/scale.py)

The suite is never part of the tests' pass/fail. Without ``--bootstrap-servers``
sections 3 and 4 start a jar-based broker (tests/kafka_broker.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from stream.config import (  # noqa: E402
    Config,
    build_learners,
    load_config,
)
from stream.events import EVENT_TYPES, Decoder  # noqa: E402
from stream.metrics import PipelineMetrics  # noqa: E402
from stream.pipeline import Pipeline  # noqa: E402
from stream.recording import RecordedMessage  # noqa: E402
from stream.simulate import SimConfig, SimEvent, simulate  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "default.toml"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- inputs


def sim_events(n: int, seed: int = 7, users: int = 5_000, items: int = 1_000) -> list[SimEvent]:
    return list(simulate(SimConfig(seed=seed, events=n, n_users=users, n_items=items)))


def as_messages(events: Iterable[SimEvent], topics: dict[str, str]) -> list[RecordedMessage]:
    return list(iter_messages(events, topics))


def iter_messages(events: Iterable[SimEvent], topics: dict[str, str]) -> Iterator[RecordedMessage]:
    offsets: dict[str, int] = {}
    for stream, key, value, ts in events:
        topic = topics[stream]
        off = offsets.get(topic, 0)
        offsets[topic] = off + 1
        yield RecordedMessage(topic, 0, off, (1, ts), key, value)


def decoded(events: Sequence[SimEvent], topics: dict[str, str]) -> list[tuple[str, Any]]:
    decoders = {stream: Decoder(t).decode for stream, t in EVENT_TYPES.items()}
    return [(topics[stream], decoders[stream](value)) for stream, _, value, _ in events]


class CountingSink:
    """Keeps nothing but counts: the outputs are still encoded by the pipeline."""

    def __init__(self) -> None:
        self.n = 0
        self.bytes = 0

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        self.n += 1
        self.bytes += len(value or b"")


# --------------------------------------------------------------------------- 1. limit, 2. backtest


def bench_limit(config: Config, events: list[tuple[str, Any]]) -> dict[str, Any]:
    """Events/s of the learners alone (wall clock), and their CPU time per event: on a shared
    machine the ratios of CPU per event are the steadier figures (others' load stretches wall time)."""
    per_learner: dict[str, float] = {}
    for learner in build_learners(config):
        mine = [e for t, e in events if t in learner.reads]
        predict, learn = learner.predict, learner.learn
        t0 = time.perf_counter()
        for e in mine:
            predict(e)
            learn(e)
        per_learner[learner.name] = len(mine) / (time.perf_counter() - t0)
    learners = build_learners(config)
    routes: dict[str, list[Any]] = {}
    for learner in learners:
        for t in learner.reads:
            routes.setdefault(t, []).append(learner)
    t0, c0 = time.perf_counter(), time.process_time()
    for topic, e in events:
        for learner in routes.get(topic, ()):
            learner.predict(e)
            learner.learn(e)
    together = len(events) / (time.perf_counter() - t0)
    cpu_us = (time.process_time() - c0) / len(events) * 1e6
    return {"per_learner_events_per_s": per_learner, "limit_events_per_s": together, "limit_cpu_us_per_event": cpu_us}


def bench_backtest(config: Config, messages: list[RecordedMessage]) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    sink = CountingSink()
    pipeline = Pipeline(
        build_learners(config), sink, contract_topics=config.input_topics(),
        dead_letter_topic=config.topics.dead_letters, max_value_bytes=config.processing.max_value_bytes,
        observer=PipelineMetrics(CollectorRegistry()),
    )  # fmt: skip
    process = pipeline.process
    t0, c0 = time.perf_counter(), time.process_time()
    for m in messages:
        process(m)
    eps = len(messages) / (time.perf_counter() - t0)
    cpu_us = (time.process_time() - c0) / len(messages) * 1e6
    return {"backtest_events_per_s": eps, "backtest_cpu_us_per_event": cpu_us, "backtest_outputs": sink.n}


# --------------------------------------------------------------------------- 3. kafka, 4. latency


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    from kafka_broker import KafkaBroker

    with KafkaBroker() as b:
        yield b.bootstrap_servers


def bench_config_text(bootstrap: str, prefix: str, group: str) -> str:
    """configs/default.toml with the benchmark's brokers, topics and group."""
    text = DEFAULT_CONFIG.read_text()
    lines = [
        "[kafka]", f'bootstrap_servers = "{bootstrap}"', f'group_id = "{group}"', "",
        "[topics]", f'clicks = "{prefix}-clicks"', f'purchases = "{prefix}-purchases"', f'prices = "{prefix}-prices"',
        f'fraud_labels = "{prefix}-fraud-labels"', f'searches = "{prefix}-searches"',
        f'dead_letters = "{prefix}-dead-letters"', "partitions = 1", "",
        "[metrics]", "port = 0", "",
        # Commits every 0.2 s so completion is seen promptly (the loop's cost is the same).
        "[processing]", "commit_interval_s = 0.2", "",
    ]  # fmt: skip
    # Keep the default file's learners (and any other sections) but replace these three.
    kept, skip = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skip = line.strip() in ("[kafka]", "[topics]", "[metrics]", "[processing]") or line.startswith("[kafka.")
        if not skip:
            kept.append(line)
    body = "\n".join(kept)
    # Output topics are per test run, so earlier runs' outputs are not read back.
    for out in ("recommendations", "price-quotes", "risk-scores", "basket-size"):
        body = body.replace(f'output_topic = "{out}"', f'output_topic = "{prefix}-{out}"')
    return "\n".join(lines) + "\n" + body


def produce_events(bootstrap: str, events: Sequence[SimEvent], topics: dict[str, str]) -> None:
    """Produce the events with **current** Kafka timestamps (the producer's clock; the
    event time stays in the payload's ``ts``): the simulator's event times are in 2023,
    and a broker with time retention (7 days by default) deletes records that old within
    minutes, so a run against a normal broker would read nothing."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
                         "queue.buffering.max.messages": 500_000})  # fmt: skip
    for stream, key, value, _ts in events:
        while True:
            try:
                producer.produce(topics[stream], value, key)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(120) == 0


def committed_total(bootstrap: str, group: str, topics: Sequence[str]) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return sum(max(tp.offset, 0) for tp in c.committed([TopicPartition(t, 0) for t in topics], timeout=10))
    finally:
        c.close()


def pinned(cmd: list[str]) -> list[str]:
    """One core for the pipeline, as the targets say."""
    return ["taskset", "-c", "0", *cmd] if shutil.which("taskset") else cmd


def create_missing_topics(bootstrap: str, names: Sequence[str]) -> None:
    """Create the topics not there yet: the learners' output topics are not prefixed per section,
    so sections 3 and 4 on one broker share them."""
    from confluent_kafka.admin import AdminClient
    from kafka_broker import create_topics

    existing = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics
    missing = [t for t in names if t not in existing]
    if missing:
        create_topics(bootstrap, missing)


def bench_kafka(bootstrap: str, config_events: Sequence[SimEvent], tmp: Path) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    group = f"{prefix}-group"
    cfg = tmp / "bench.toml"
    cfg.write_text(bench_config_text(bootstrap, prefix, group))
    config = load_config(cfg)
    topics = config.input_topics()
    from stream.config import all_topics

    create_missing_topics(bootstrap, list(all_topics(config)))
    log(f"kafka: producing {len(config_events)} events")
    produce_events(bootstrap, config_events, topics)
    # Only what the learners read is consumed (and committed) by `stream run`.
    read = sorted({t for learner in build_learners(config) for t in learner.reads})
    n = sum(1 for stream, *_ in config_events if topics[stream] in read)

    # Raw consumption, nothing else: the Kafka share of the cost.
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-raw", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})  # fmt: skip
    c.subscribe(read)
    got, t_first = 0, 0.0
    while got < n:
        batch = c.consume(1000, 1.0)
        if batch and not t_first:
            t_first = time.perf_counter()
        got += sum(1 for m in batch if m.error() is None)
    raw_eps = n / (time.perf_counter() - t_first)
    c.close()

    log("kafka: stream run")
    logf = open(tmp / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(pinned([sys.executable, "-m", "stream", "run", "--config", str(cfg)]), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=logf)  # fmt: skip
    from peers import process_cpu_s

    try:
        # Start the clock when partitions are assigned: imports and the group join are not throughput.
        deadline = time.monotonic() + 600
        t_start = cpu_start = 0.0
        while time.monotonic() < deadline:
            if not t_start and b"partitions assigned" in (tmp / "run.log").read_bytes():
                t_start, cpu_start = time.perf_counter(), process_cpu_s(proc.pid)
            if t_start and committed_total(bootstrap, group, read) >= n:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"stream run did not finish; see {tmp / 'run.log'}")
        kafka_eps = n / (time.perf_counter() - t_start)
        # The whole process (librdkafka's threads too), per event read.
        kafka_cpu_us = (process_cpu_s(proc.pid) - cpu_start) / n * 1e6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        logf.close()
    return {"kafka_events_per_s": kafka_eps, "kafka_cpu_us_per_event": kafka_cpu_us,
            "raw_consume_events_per_s": raw_eps, "kafka_events": n}  # fmt: skip


def own_latency_buckets(port: int) -> list[tuple[float, float]]:
    """``stream_pipeline_latency_seconds`` (consumed -> outputs acknowledged) as (le, cumulative count)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "stream_pipeline_latency_seconds":
            return [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    return []


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile``: linear within the bucket holding the q-th observation.

    >>> histogram_quantile(0.5, [(0.01, 50.0), (0.02, 100.0), (float("inf"), 100.0)])
    0.01
    >>> histogram_quantile(0.75, [(0.01, 50.0), (0.02, 100.0), (float("inf"), 100.0)])
    0.015
    """
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: that bound, as Prometheus does
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


def bench_latency(bootstrap: str, rate: float, duration_s: float, tmp: Path) -> dict[str, Any]:
    from confluent_kafka import Consumer, Producer
    from kafka_broker import free_port

    prefix = f"lat-{uuid.uuid4().hex[:6]}"
    group = f"{prefix}-group"
    cfg = tmp / "lat.toml"
    # /metrics on a known port: the pipeline's own share (consumed -> outputs acknowledged) is read there.
    port = free_port()
    cfg.write_text(bench_config_text(bootstrap, prefix, group).replace(
        "[metrics]\nport = 0\n", f'[metrics]\nport = {port}\nhost = "127.0.0.1"\n'))  # fmt: skip
    config = load_config(cfg)
    from stream.config import all_topics

    create_missing_topics(bootstrap, list(all_topics(config)))
    topics = config.input_topics()
    n = int(rate * duration_s)
    events = sim_events(n + 5000, seed=11)
    warm, events = events[:5000], events[5000:]
    produce_events(bootstrap, warm, topics)  # models and state warm before measuring
    outputs = [t for t in all_topics(config) if t not in topics.values() and t != config.topics.dead_letters]
    logf = open(tmp / "lat.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(pinned([sys.executable, "-m", "stream", "run", "--config", str(cfg)]), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=logf)  # fmt: skip
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    raw: list[float] = []
    inputs = sorted(set(topics.values()))
    by_topic: dict[str, list[float]] = {}
    stop = threading.Event()

    def receive() -> None:
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-reader", "auto.offset.reset": "latest",
                      "fetch.wait.max.ms": 5, "fetch.min.bytes": 1})  # fmt: skip
        # The inputs too: one plain produce -> consume hop, side by side with the pipeline's two hops.
        c.subscribe(outputs + inputs)
        while not stop.is_set():
            for m in c.consume(500, 0.1):
                value, topic = m.value(), m.topic()
                if m.error() is None and value is not None and topic is not None:
                    now = time.time()
                    t = sent.get(json.loads(value)["event_id"].encode())
                    if t is not None:
                        ms = (now - t) * 1000
                        (raw if topic in inputs else latencies).append(ms)
                        by_topic.setdefault(topic, []).append(ms)
        c.close()

    try:
        while committed_total(bootstrap, group, list(topics.values())) < len(warm):
            time.sleep(0.2)
        warm_buckets = own_latency_buckets(port)  # the warm-up's backlog is not part of the figure
        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        time.sleep(3)  # the reader's group join
        # Batching as a shop front end would (its 5 ms are part of the latency measured).
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
        t0 = time.perf_counter()
        for i, (stream, key, value, _) in enumerate(events):
            target = t0 + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            event_id = json.loads(value)["event_id"].encode()
            sent[event_id] = time.time()
            producer.produce(topics[stream], value, key)
            producer.poll(0)
        producer.flush(30)
        time.sleep(3)
        own = [(le, c - c0) for (le, c), (_, c0) in zip(own_latency_buckets(port), warm_buckets, strict=True)]
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        logf.close()
        keep = os.environ.get("BENCH_KEEP_LOGS")
        if keep:
            shutil.copy(tmp / "lat.log", Path(keep) / "latency-run.log")
    lat = np.array(latencies)
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {"latency_rate_events_per_s": rate, "latency_samples": len(lat), "latency_p50_ms": pct(50),
            "latency_p99_ms": pct(99), "latency_p999_ms": pct(99.9),
            "raw_hop_latency_p50_ms": float(np.percentile(raw, 50)) if raw else float("nan"),
            "raw_hop_latency_p99_ms": float(np.percentile(raw, 99)) if raw else float("nan"),
            "latency_p50_ms_by_topic": {t: float(np.percentile(v, 50)) for t, v in sorted(by_topic.items())},
            # The pipeline's own share: consumed -> every output acknowledged (stream_pipeline_latency_seconds).
            "own_latency_records": own[-1][1] if own else 0,
            "own_latency_buckets_cumulative": own,
            "own_latency_p50_ms": histogram_quantile(0.5, own) * 1000,
            "own_latency_p99_ms": histogram_quantile(0.99, own) * 1000,
            "own_latency_p999_ms": histogram_quantile(0.999, own) * 1000,
            }  # fmt: skip


# --------------------------------------------------------------------------- 5. growth, 6. checkpoint


def synthetic(n: int, users: int, items: int, seed: int = 3) -> Iterator[SimEvent]:
    """A stream whose distinct users and items are exactly controlled (the simulator's
    sessions revisit users): user ``i % users``, Zipf items, a price event every 50."""
    rng = np.random.default_rng(seed)
    item_idx = np.minimum(rng.zipf(1.3, size=n) - 1, items - 1)
    cats = rng.integers(0, 20, size=items)
    ts0 = 1_700_000_000_000
    for i in range(n):
        ts = ts0 + i * 20
        it = int(item_idx[i])
        user = f"u{(i * 7919) % users}"
        if i % 50 == 0:
            doc = {"event_id": f"r{i}", "ts": ts, "item_id": f"i{it}", "price": 10.0 + it % 7, "cost": 6.0,
                   "stock": 5, "category": f"c{cats[it]}"}  # fmt: skip
            yield "prices", f"i{it}".encode(), json.dumps(doc).encode(), ts
        elif i % 25 == 0:
            doc = {"event_id": f"p{i}", "ts": ts, "order_id": f"o{i}", "user_id": user, "item_id": f"i{it}",
                   "quantity": 1, "unit_price": 10.0 + it % 7, "category": f"c{cats[it]}", "payment_method": "card",
                   "country": "US", "shipping_country": "US", "account_age_days": 100.0,
                   "device_id": f"d{i % 97}"}  # fmt: skip
            yield "purchases", user.encode(), json.dumps(doc).encode(), ts
        else:
            doc = {"event_id": f"c{i}", "ts": ts, "user_id": user, "item_id": f"i{it}", "category": f"c{cats[it]}",
                   "price": 10.0 + it % 7}  # fmt: skip
            yield "clicks", user.encode(), json.dumps(doc).encode(), ts


def growth_point(users: int, items: int, n: int) -> dict[str, Any]:
    """One growth measurement (run in its own process so RSS is its own)."""
    config = load_config(DEFAULT_CONFIG)
    sink = CountingSink()
    pipeline = Pipeline(build_learners(config), sink, contract_topics=config.input_topics(),
                        dead_letter_topic=config.topics.dead_letters)  # fmt: skip
    process = pipeline.process
    # Inputs are generated as they are consumed, so RSS is the learners' (plus the
    # generator's cost in events/s, the same at every point); sampled ten times along
    # the run, the timeline shows where the bounds are reached and memory stops growing.
    timeline: list[float] = []
    every = max(n // 10, 1)
    t0 = time.perf_counter()
    for i, m in enumerate(iter_messages(synthetic(n, users, items), config.input_topics()), 1):
        process(m)
        if i % every == 0:
            timeline.append(round(rss_mb(), 1))
    eps = n / (time.perf_counter() - t0)
    return {"events_per_s": eps, "rss_mb": rss_mb(), "rss_mb_timeline": timeline}


def run_growth_point(users: int, items: int, n: int) -> dict[str, Any]:
    out = subprocess.run(
        pinned([sys.executable, __file__, "--growth-point", f"{users},{items},{n}"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_growth(max_users: int, max_items: int) -> dict[str, Any]:
    by_users: dict[str, dict[str, Any]] = {}
    u = 10_000
    while u <= max_users:
        n = max(u, 100_000)
        log(f"growth: users={u} items=1000 events={n}")
        by_users[str(u)] = run_growth_point(u, 1_000, n)
        u *= 10
    by_items: dict[str, dict[str, Any]] = {}
    i = 1_000
    while i <= max_items:
        log(f"growth: users=10000 items={i}")
        by_items[str(i)] = run_growth_point(10_000, i, 100_000)
        i *= 10
    return {
        "rss_mb_by_users": {k: v["rss_mb"] for k, v in by_users.items()},
        "events_per_s_by_users": {k: v["events_per_s"] for k, v in by_users.items()},
        "rss_mb_timeline_by_users": {k: v["rss_mb_timeline"] for k, v in by_users.items()},
        "rss_mb_by_items": {k: v["rss_mb"] for k, v in by_items.items()},
        "events_per_s_by_items": {k: v["events_per_s"] for k, v in by_items.items()},
    }


def background_checkpoint(store: Any, learners: Any, seen: int) -> tuple[float, float]:
    """What `stream run` does for a periodic checkpoint (``[checkpoints] background``):
    fork, the child writes; returns the parent's pause (the fork) and the child's time."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            store.write(learners, {("clicks", 0): seen}, reason="bench")
            code = 0
        finally:
            os._exit(code)
    pause = time.perf_counter() - t0
    _, status = os.waitpid(pid, 0)
    assert status == 0, "the background checkpoint failed"
    return pause, time.perf_counter() - t0


def bench_checkpoint(max_users: int, tmp: Path) -> dict[str, Any]:
    from stream.state import CheckpointStore, LocalStorage

    config = load_config(DEFAULT_CONFIG)
    topics = config.input_topics()
    learners = build_learners(config)
    sink = CountingSink()
    pipeline = Pipeline(learners, sink, contract_topics=topics, dead_letter_topic=config.topics.dead_letters)
    rows: dict[str, dict[str, float]] = {}
    seen = 0
    u = 10_000
    while u <= max_users:
        for m in as_messages(synthetic(u - seen, u, 1_000, seed=u), topics):
            pipeline.process(m)
        seen = u
        store = CheckpointStore(LocalStorage(tmp / f"ckpt-{u}"))
        t0 = time.perf_counter()
        info = store.write(learners, {("clicks", 0): seen}, reason="bench")
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.load(info.name)
        restore_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (tmp / f"ckpt-{u}").iterdir())
        pause_s, background_s = background_checkpoint(store, learners, seen)
        rows[str(u)] = {"checkpoint_seconds": write_s, "restore_seconds": restore_s, "size_mb": size / 2**20,
                        "background_pause_seconds": pause_s, "background_seconds": background_s}  # fmt: skip
        log(
            f"checkpoint: users={u} write={write_s:.3f}s restore={restore_s:.3f}s size={size / 2**20:.1f}MB "
            f"background: loop paused {pause_s * 1000:.1f} ms, child wrote in {background_s:.3f}s"
        )
        u *= 10
    largest = rows[max(rows, key=int)]
    return {"checkpoint_by_users": rows, "checkpoint_seconds": largest["checkpoint_seconds"],
            "checkpoint_background_pause_seconds": largest["background_pause_seconds"],
            "restore_seconds": largest["restore_seconds"], "checkpoint_mb": largest["size_mb"]}  # fmt: skip


# --------------------------------------------------------------------------- 7. flood


def flood(n: int, category_every: int = 8) -> Iterator[SimEvent]:
    """An identity flood: each user has two events (a click, then a click or a
    purchase), every event names a new item, every purchase a new order and device,
    and a new category starts every ``category_every`` events; a price event every 50
    (a new item's), a fraud label every 1000 (for a recent order)."""
    ts0 = 1_700_000_000_000
    orders: collections.deque[str] = collections.deque(maxlen=256)
    for i in range(n):
        ts = ts0 + i * 20
        user, item, cat = f"fu{i // 2}", f"fi{i}", f"fc{i // category_every}"
        if i % 50 == 0:
            doc: dict[str, Any] = {"event_id": f"r{i}", "ts": ts, "item_id": item, "price": 10.0 + i % 7,
                                   "cost": 6.0, "stock": 5, "category": cat}  # fmt: skip
            yield "prices", item.encode(), json.dumps(doc).encode(), ts
        elif i % 50 == 25:
            order = f"fo{i}"
            orders.append(order)
            doc = {"event_id": f"p{i}", "ts": ts, "order_id": order, "user_id": user, "item_id": item,
                   "quantity": 1 + i % 3, "unit_price": 10.0 + i % 7, "category": cat, "payment_method": "card",
                   "country": "US", "shipping_country": "US" if i % 7 else "FR", "account_age_days": float(i % 400),
                   "device_id": f"fd{i}"}  # fmt: skip
            yield "purchases", user.encode(), json.dumps(doc).encode(), ts
        elif i % 1000 == 1 and orders:
            order = orders[0]
            doc = {"event_id": f"l{i}", "ts": ts, "order_id": order, "is_fraud": True}
            yield "fraud_labels", order.encode(), json.dumps(doc).encode(), ts
        else:
            doc = {"event_id": f"c{i}", "ts": ts, "user_id": user, "item_id": item, "category": cat,
                   "price": 10.0 + i % 7}  # fmt: skip
            yield "clicks", user.encode(), json.dumps(doc).encode(), ts


#: Per-key bounds lowered by ``--flood-scale`` (the default config's values divided by it).
_FLOOD_BOUNDS = ("max_users", "max_items", "max_pending", "max_categories", "max_one_hot")


def flood_config(scale: int) -> Config:
    """The default config with every per-key capacity divided by ``scale``."""
    import msgspec

    config = load_config(DEFAULT_CONFIG)
    learners = {}
    for name, spec in config.learners.items():
        changes = {f: max(getattr(spec, f) // scale, 1) for f in _FLOOD_BOUNDS if hasattr(spec, f)}
        learners[name] = msgspec.structs.replace(spec, **changes)
    return msgspec.structs.replace(config, learners=learners)


def state_sizes(learners: Sequence[Any]) -> dict[str, dict[str, int]]:
    return {learner.name: learner.state_sizes() for learner in learners if hasattr(learner, "state_sizes")}


class _ByteCounter:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        self.n += n
        return n


def pickled_bytes(learners: Any) -> int:
    """The learners' pickled size, counted by a forked child as a background checkpoint
    would be written: pickling in this process would raise the RSS measured (the
    pickler's memo and the packed matrices; freed memory is not given back)."""
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            counter = _ByteCounter()
            pickle.dump(learners, counter, protocol=pickle.HIGHEST_PROTOCOL)
            os.write(write, str(counter.n).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return int(data)


def flood_point(n: int, scale: int, category_every: int, samples: int = 30) -> dict[str, Any]:
    """One flood run (in its own process so RSS is its own): RSS every ``n / samples``
    events, the pickled learners' size at three points, and the structures' sizes."""
    config = flood_config(scale)
    learners = build_learners(config)
    pipeline = Pipeline(learners, CountingSink(), contract_topics=config.input_topics(),
                        dead_letter_topic=config.topics.dead_letters)  # fmt: skip
    process = pipeline.process
    every = max(n // samples, 1)
    pickle_at = {n // 3, 2 * n // 3, n}
    timeline: list[tuple[int, float]] = [(0, round(rss_mb(), 1))]
    pickled: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, m in enumerate(iter_messages(flood(n, category_every), config.input_topics()), 1):
        process(m)
        if i % every == 0:
            timeline.append((i, round(rss_mb(), 1)))
        if i in pickle_at:
            pickled[str(i)] = round(pickled_bytes(learners) / 2**20, 2)
    eps = n / (time.perf_counter() - t0)
    return {"events_per_s": eps, "rss_mb_timeline": timeline, "pickled_mb": pickled,
            "state_sizes": state_sizes(learners)}  # fmt: skip


def growth_rate(timeline: Sequence[tuple[int, float]], lo: int, hi: int) -> float:
    """Bytes per event between the samples nearest ``lo`` and ``hi`` events."""
    a = min(timeline, key=lambda p: abs(p[0] - lo))
    b = min(timeline, key=lambda p: abs(p[0] - hi))
    return (b[1] - a[1]) * 2**20 / max(b[0] - a[0], 1)


def bench_flood(n: int, scale: int, category_every: int) -> dict[str, Any]:
    log(f"flood: {n} events, bounds / {scale}, a new category every {category_every} events")
    out = subprocess.run(
        pinned([sys.executable, __file__, "--flood-point", f"{n},{scale},{category_every}"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    point = json.loads(out.stdout.strip().splitlines()[-1])
    timeline = point["rss_mb_timeline"]
    # The first stretch: until the recommender's users are full (two events per user).
    first = min(n // 5, 2 * max(200_000 // scale, 1))
    before = growth_rate(timeline, 0, first)
    after = growth_rate(timeline, n // 2, n)
    ratio = after / before if before > 0 else float("nan")
    log(
        f"7 flood: RSS {timeline[0][1]} -> {timeline[-1][1]} MB; {before:,.0f} bytes/event over the first "
        f"{first:,} events, {after:,.0f} bytes/event over the last half (ratio {ratio:.3f}, target < 0.05: "
        f"{'met' if ratio < 0.05 else 'missed'}); pickled learners {point['pickled_mb']} MB"
    )
    log(f"  RSS timeline (events, MB): {timeline}")
    return {"flood_events": n, "flood_scale": scale, "flood_category_every": category_every,
            "flood_events_per_s": point["events_per_s"], "flood_rss_mb_timeline": timeline,
            "flood_bytes_per_event_first": before, "flood_bytes_per_event_last_half": after,
            "flood_growth_ratio": ratio, "flood_pickled_mb": point["pickled_mb"],
            "flood_state_sizes": point["state_sizes"]}  # fmt: skip


# --------------------------------------------------------------------------- main


# --------------------------------------------------------------------------- 8. demand quality


#: The demand world (SimConfig.demand): a 200-item shop whose 100k events span ~11 days of event time.
def demand_sim_config(seed: int, events: int) -> Any:
    from stream.world import DemandSim

    return SimConfig(seed=seed, events=events, n_users=2_000, n_items=200, sessions_per_s=0.02,
                     base_conversion=0.08, demand=DemandSim())  # fmt: skip


def bench_demand(config: Config, seeds: Sequence[int], events: int) -> dict[str, Any]:
    """The ``demand`` learner of the config on the demand world, per seed: WAPE and MAE
    against the seasonal naive baseline and interval coverage per horizon (rolling: the
    last ``evaluation_window`` windows, and cumulative), the sources served, stock-out
    warnings (the forecasts' ``warning`` flag) scored against the simulated stock-outs
    (with the recall ceiling: the share of stock-outs that came at least a lead time
    after their cycle's restock, the only ones a warning in their cycle can precede by a
    lead time), and the learner's time per event it reads (wall and CPU)."""
    from stream.events import Decoder, Price, Purchase
    from stream.learners.demand import DemandSpec
    from stream.simulate import Simulation

    spec = next(s for s in config.learners.values() if isinstance(s, DemandSpec))
    out: dict[str, Any] = {}
    for seed in seeds:
        sim = Simulation(demand_sim_config(seed, events))
        raw = list(sim)
        dp, du = Decoder(Price), Decoder(Purchase)
        read = [dp.decode(v) if s == "prices" else du.decode(v) for s, _, v, _ in raw if s in ("prices", "purchases")]
        learner: Any = spec.build("demand", config.input_topics())
        lead_ms = int(spec.lead_time_s * 1000)
        preds: list[Any] = []
        elapsed, cpu = time.perf_counter(), time.process_time()
        for e in read:
            preds.append(learner.predict(e))
            learner.learn(e)
        elapsed, cpu = time.perf_counter() - elapsed, time.process_time() - cpu
        warnings: list[tuple[str, int]] = []
        sources: dict[str, int] = {}
        for pred in preds:
            for f in pred.forecasts if pred is not None else ():
                sources[f.source] = sources.get(f.source, 0) + 1
                if f.warning and f.horizon_s == spec.horizons_s[0]:  # one per item and moment
                    warnings.append((f.item_id, f.ts))
        q = {(m, w): v for m, w, v in learner.quality()}
        row: dict[str, Any] = {
            "events": events,
            "days": (sim.truth.end_ts - sim.truth.start_ts) / 86_400_000,
            "events_read": len(read),
            "us_per_event_read": elapsed / len(read) * 1e6,
            "cpu_us_per_event_read": cpu / len(read) * 1e6,
            "sources": sources,
        }
        for label in learner.labels:
            for w in ("rolling", "cumulative"):
                wape, base = q[(f"wape_{label}", w)], q[(f"baseline_wape_{label}", w)]
                row[f"{label}_{w}"] = {
                    "wape": wape, "baseline_wape": base, "wape_ratio": wape / base if base else None,
                    "mae": q[(f"mae_{label}", w)], "baseline_mae": q[(f"baseline_mae_{label}", w)],
                    "coverage": q[(f"coverage_{label}", w)], "censored_share": q[(f"censored_share_{label}", w)],
                }  # fmt: skip
        row["stockouts"] = sim.truth.score_stockout_warnings(warnings, lead_ms)
        row["stockouts"]["recall_ceiling"] = _warnable_share(sim.truth.demand, sim.truth.start_ts, lead_ms)
        out[str(seed)] = row
        log(f"8 demand seed {seed}: {json.dumps(row, default=float)}")
    return {"demand": out}


def _warnable_share(demand: Any, start_ts: int, lead_ms: int) -> float | None:
    """Share of the stock-outs that came at least ``lead_ms`` after their cycle began (the
    item's last restock, or the stream's start)."""
    restocks: dict[str, list[int]] = {}
    for r in demand["restocks"]:
        restocks.setdefault(r["item_id"], []).append(r["ts"])
    outs = demand["stockouts"]
    if not outs:
        return None
    ok = 0
    for o in outs:
        began = max((t for t in restocks.get(o["item_id"], []) if t <= o["start"]), default=start_ts)
        ok += o["start"] - began >= lead_ms
    return ok / len(outs)


# --------------------------------------------------------------------------- 9. ranking


def clock_cost(clock: Any, n: int = 200_000) -> float:
    """Seconds one read of ``clock`` takes (the least of a few tries)."""
    best = math.inf
    for _ in range(5):
        t0 = clock()
        for _ in range(n):
            clock()
        best = min(best, (clock() - t0) / n)
    return best


def ranking_run(seed: int, requests: int, config: Config) -> dict[str, Any]:
    """One seed: the default config's ranking learner on a simulated stream with about
    ``requests`` search and ads requests (50 candidates a search, 20 ads, 3 ad slots),
    scored on the simulator's true relevance; the quality figures are over the last
    fifth of the requests (the learner at ``requests``), the cost over all of them.

    Cost: a request's own work is scoring it (``predict``), opening it (``learn``) and
    learning from its labels when its window closes (the learner's ``advance``, timed
    apart: called between ``predict`` and ``learn``, where ``learn`` calls it first, so
    nothing changes); ``us_per_request`` is that per request. The clicks and purchases
    (joining them to requests and the user and item state the features read) are
    ``us_per_click``; ``us_per_request_all`` is everything the learner did, per request.
    All in thread CPU time (the machine is shared); the whole loop's wall time apart."""
    from stream.learners.ranking import RankingLearner
    from stream.scoring import _Replay
    from stream.simulate import Simulation

    spec = config.learners["ranking"]
    sim = Simulation(SimConfig(seed=seed, events=int(requests * 5.2), searches_per_session=2.0))
    decode = {s: Decoder(EVENT_TYPES[s]).decode for s in ("searches", "clicks", "purchases")}
    events = [(s, decode[s](v)) for s, _, v, _ in sim if s in decode]
    truth = sim.truth
    learner = spec.build("ranking", config.input_topics())
    assert isinstance(learner, RankingLearner)
    # CPU time of this thread: on a shared machine the wall time of a few microseconds is
    # mostly waiting for a core. Each interval also holds about one clock read: subtracted.
    clock = time.thread_time
    tick = clock_cost(clock)
    spent = {"searches": 0.0, "clicks": 0.0, "purchases": 0.0}
    closing_s = 0.0
    predict_s = 0.0
    predict_search_s = 0.0
    outputs: list[tuple[Any, Any]] = []
    wall0 = time.perf_counter()
    for stream, e in events:
        t0 = clock()
        out = learner.predict(e)
        t1 = clock()
        learner.advance(e.ts)
        t2 = clock()
        learner.learn(e)
        spent[stream] += t1 - t0 + clock() - t2 - 2 * tick
        closing_s += t2 - t1 - tick
        if out is not None:
            predict_s += t1 - t0 - tick
            if e.kind == "search":
                predict_search_s += t1 - t0 - tick
            outputs.append((e, [r.item_id for r in out.items]))
    wall_s = time.perf_counter() - wall0
    n = len(outputs)
    late = outputs[n - n // 5 :]
    ndcg, ndcg0, rev, rev_bid = [], [], [], []
    replay = _Replay()
    for e, ours in late:
        user, query, ts = e.user_id, e.query, e.ts
        if e.kind == "search":
            ndcg.append(truth.ranking_ndcg(user, query, ours, ts))
            ndcg0.append(truth.ranking_ndcg(user, query, e.candidates, ts))
        else:
            bid = {c.item_id: c.bid for c in reversed(e.candidates)}
            by_bid = sorted(bid, key=lambda i: -bid[i])
            rev.append(truth.ads_value(user, query, ours, [bid[i] for i in ours], ts))
            rev_bid.append(truth.ads_value(user, query, by_bid, [bid[i] for i in by_bid], ts))
    late_ids = {e.request_id: ours for e, ours in late if e.kind == "ads"}
    for stream, e in events:  # replay of the top ad slot over the same requests, from the logged clicks
        if stream == "searches" and e.request_id in late_ids:
            bid = {c.item_id: c.bid for c in reversed(e.candidates)}
            replay.request(e, late_ids[e.request_id][0], max(bid, key=lambda i: bid[i]))
        elif stream == "clicks":
            replay.click(e)
    n_search = sum(1 for e, _ in outputs if e.kind == "search")
    quality = {(m, w): v for m, w, v in learner.quality()}
    return {
        "seed": seed,
        "events": len(events),
        "requests": n,
        "search_requests": n_search,
        "ndcg_at_10_truth": float(np.mean(ndcg)),
        "ndcg_at_10_truth_original": float(np.mean(ndcg0)),
        "ndcg_gain": float(np.mean(ndcg) / np.mean(ndcg0) - 1),
        "ads_revenue_per_request": float(np.mean(rev)),
        "ads_revenue_per_request_by_bid": float(np.mean(rev_bid)),
        "ads_revenue_gain": float(np.mean(rev) / np.mean(rev_bid) - 1),
        **replay.results(),
        "exploration_rate": learner.ranking.get("exploration_rate", "cumulative"),
        "examination_estimate": [round(float(v), 3) for v in learner.examination["search"][:5]],
        "examination_true": [round(float(v), 3) for v in truth.search.examination(5)],  # type: ignore[union-attr]
        "us_per_request_predict": predict_s / n * 1e6,
        "us_per_search_predict_50_candidates": predict_search_s / n_search * 1e6,
        "us_per_request_searches": spent["searches"] / n * 1e6,
        "us_per_request_learning": closing_s / n * 1e6,
        "us_per_request": (spent["searches"] + closing_s) / n * 1e6,
        "us_per_request_all": (sum(spent.values()) + closing_s) / n * 1e6,
        "us_per_request_all_wall": wall_s / n * 1e6,
        "us_clock_read": tick * 1e6,
        "us_per_click": spent["clicks"] / max(1, sum(1 for s, _ in events if s == "clicks")) * 1e6,
        "online_ndcg_at_10": learner.ranking.get("ndcg_at_10", "cumulative"),
        "online_ndcg_at_10_original": learner.ranking.get("ndcg_at_10_original", "cumulative"),
        "quality_keys": sorted({m for m, _ in quality}),
    }


def bench_ranking(config: Config, seeds: Sequence[int], requests: int) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        r = ranking_run(seed, requests, config)
        log(
            f"9 ranking seed {seed}: {r['requests']:,} requests; NDCG@10 {r['ndcg_at_10_truth']:.4f} vs engine "
            f"{r['ndcg_at_10_truth_original']:.4f} ({r['ndcg_gain']:+.1%}); ads {r['ads_revenue_per_request']:.4f} "
            f"vs by bid {r['ads_revenue_per_request_by_bid']:.4f} ({r['ads_revenue_gain']:+.1%}); "
            f"{r['us_per_search_predict_50_candidates']:.0f} us scoring 50 candidates, {r['us_per_request']:.0f} us "
            f"a request (scoring and learning), {r['us_per_request_all']:.0f} us all per request (CPU time; "
            f"{r['us_per_request_all_wall']:.0f} us wall)"
        )
        runs.append(r)
    return {"ranking": runs}


SECTIONS = (
    "limit", "backtest", "kafka", "latency", "growth", "checkpoint", "flood", "demand", "ranking", "quality", "peers",
    "scale",
)  # fmt: skip


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000, help="events for sections 1-3 (default 100000)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--max-users", type=int, default=1_000_000)
    p.add_argument("--max-items", type=int, default=100_000)
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--flood-events", type=int, default=1_500_000)
    p.add_argument("--flood-scale", type=int, default=10, help="per-key bounds divided by this in the flood")
    p.add_argument("--flood-category-every", type=int, default=8, help="a new category every N flood events")
    p.add_argument("--demand-seeds", default="0,1,2", help="seeds of the demand quality section")
    p.add_argument("--demand-events", type=int, default=100_000, help="events per seed of the demand section")
    p.add_argument("--ranking-seeds", default="1,2,3", help="seeds of section 9 (default 1,2,3)")
    p.add_argument("--ranking-requests", type=int, default=50_000, help="requests per seed in section 9")
    p.add_argument("--quality-seeds", default="0,1,2", help="seeds of the quality section (bench/quality.py)")
    p.add_argument("--quality-lengths", default="30000,300000", help="stream lengths of the quality section")
    p.add_argument("--peers-events", type=int, default=100_000, help="purchase events of the peers section")
    p.add_argument("--peers-rounds", type=int, default=3, help="rounds of the peers section (median reported)")
    p.add_argument("--peers-systems", default="stream,plain,quix,bytewax", help="systems of the peers section")
    p.add_argument("--peers-baseline", type=Path, metavar="DIR",
                   help="also run `stream run` from this source tree (git archive COMMIT | tar -x -C DIR): "
                   "before/after in the same run, ratio stream/stream-base")  # fmt: skip
    p.add_argument("--scale-seeds", default="0,1,2", help="seeds of the scale section (bench/scale.py)")
    p.add_argument("--scale-lengths", default="30000,100000", help="stream lengths of the scale section")
    p.add_argument("--scale-tasks", type=int, default=4, help="tasks of the scale section")
    p.add_argument("--growth-point", help=argparse.SUPPRESS)
    p.add_argument("--flood-point", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.growth_point:
        users, items, n = (int(x) for x in args.growth_point.split(","))
        print(json.dumps(growth_point(users, items, n)))
        return 0
    if args.flood_point:
        n, scale, every = (int(x) for x in args.flood_point.split(","))
        print(json.dumps(flood_point(n, scale, every)))
        return 0

    skip = {s for s in args.skip.split(",") if s}
    config = load_config(DEFAULT_CONFIG)
    topics = config.input_topics()
    fig: dict[str, Any] = {"machine": machine(), "events": args.events}
    log(f"simulating {args.events} events")
    events = sim_events(args.events)
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if "limit" not in skip:
            fig |= bench_limit(config, decoded(events, topics))
            log(f"1 limit: {fig['limit_events_per_s']:,.0f} events/s  {fig['per_learner_events_per_s']}")
        if "backtest" not in skip:
            fig |= bench_backtest(config, as_messages(events, topics))
            log(f"2 backtest: {fig['backtest_events_per_s']:,.0f} events/s")
        need_kafka = not {"kafka", "latency", "peers"} <= skip
        with broker(args.bootstrap_servers) if need_kafka else contextlib.nullcontext("") as bootstrap:
            if "kafka" not in skip:
                fig |= bench_kafka(bootstrap, events, tmp)
                log(f"3 kafka: {fig['kafka_events_per_s']:,.0f} events/s, raw {fig['raw_consume_events_per_s']:,.0f}")
            if "latency" not in skip:
                rate = 0.5 * fig.get("kafka_events_per_s", 5_000)
                fig |= bench_latency(bootstrap, rate, args.latency_seconds, tmp)
                p50, p99 = fig["latency_p50_ms"], fig["latency_p99_ms"]
                log(
                    f"4 latency at {rate:,.0f}/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms; one plain Kafka hop: "
                    f"p50 {fig['raw_hop_latency_p50_ms']:.1f} ms, p99 {fig['raw_hop_latency_p99_ms']:.1f} ms"
                )
                own = [fig[f"own_latency_{q}_ms"] for q in ("p50", "p99", "p999")]
                log(
                    f"4 the pipeline's own share (consumed -> outputs acknowledged): p50 {own[0]:.1f} ms, "
                    f"p99 {own[1]:.1f} ms, p99.9 {own[2]:.1f} ms (target p99 < 20 ms: "
                    f"{'met' if own[1] < 20 else 'missed'})"
                )
            if "peers" not in skip:
                from peers import bench_peers

                fig |= bench_peers(bootstrap, args.peers_events, args.peers_rounds, tmp, log, args.peers_baseline,
                                   args.peers_systems.split(","))  # fmt: skip
        if "growth" not in skip:
            fig |= bench_growth(args.max_users, args.max_items)
        if "checkpoint" not in skip:
            fig |= bench_checkpoint(args.max_users, tmp)
        if "flood" not in skip:
            fig |= bench_flood(args.flood_events, args.flood_scale, args.flood_category_every)
        if "demand" not in skip:
            fig |= bench_demand(config, [int(x) for x in args.demand_seeds.split(",")], args.demand_events)
        if "ranking" not in skip:
            seeds = [int(x) for x in args.ranking_seeds.split(",")]
            fig |= bench_ranking(config, seeds, args.ranking_requests)
        if "quality" not in skip:
            from quality import bench_quality  # bench/quality.py, next to this file

            seeds = [int(x) for x in args.quality_seeds.split(",")]
            fig |= bench_quality(seeds, [int(x) for x in args.quality_lengths.split(",")])
        if "scale" not in skip:
            from scale import bench_scale  # bench/scale.py, next to this file

            seeds = [int(x) for x in args.scale_seeds.split(",")]
            lengths = [int(x) for x in args.scale_lengths.split(",")]
            fig |= bench_scale(seeds, lengths, args.scale_tasks, 100, log)
    limit = fig.get("limit_events_per_s")
    if limit:
        if "backtest_events_per_s" in fig:
            fig["ratio_backtest_to_limit"] = fig["backtest_events_per_s"] / limit
            # The same ratio from CPU time per event (steadier on a shared machine).
            fig["cpu_ratio_backtest_to_limit"] = fig["limit_cpu_us_per_event"] / fig["backtest_cpu_us_per_event"]
        if "kafka_events_per_s" in fig:
            fig["ratio_kafka_to_limit"] = fig["kafka_events_per_s"] / limit
            fig["ratio_raw_consume_to_limit"] = fig["raw_consume_events_per_s"] / limit
            # Per event read by the learners in section 3 (the limit's events include topics no learner reads).
            share = fig["kafka_events"] / fig["events"]
            fig["cpu_ratio_kafka_to_limit"] = fig["limit_cpu_us_per_event"] / share / fig["kafka_cpu_us_per_event"]
        for name in ("backtest", "kafka"):
            if f"ratio_{name}_to_limit" in fig:
                target = {"backtest": 0.95, "kafka": 0.85}[name]
                wall, cpu = fig[f"ratio_{name}_to_limit"], fig[f"cpu_ratio_{name}_to_limit"]
                log(f"ratio {name}/limit: {wall:.2f} (wall), {cpu:.2f} (CPU per event); target >= {target}")
    print(json.dumps(fig, indent=2, default=float))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
