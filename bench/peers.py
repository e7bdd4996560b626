"""The peers section of the bench: one job, several systems, the same broker, the same run.

The job (issue 17): one learner, ``StandardScaler | LinearRegression`` predicting ``quantity``
from ``unit_price``, ``category``, ``payment_method`` and ``account_age_days``, over purchase
events in a 3-partition topic, test-then-train, one JSON prediction per event to an output
topic. Each system runs in its own process pinned to one core (``taskset -c 0``), reads the
same preloaded input topic from the beginning (its own group) and writes its own output topic:

* ``stream``   ``stream run`` with a config holding only that learner (validation, dead
               letters, metrics, event-time alignment, at-least-once commits: all defaults on);
* ``plain``    a hand-written confluent-kafka loop: ``json.loads``, the River model,
               ``json.dumps``, ``produce``; every second ``flush`` then ``commit`` (at-least-once);
* ``quix``     Quix Streams (``pip install -e '.[bench]'``): a StreamingDataFrame ``apply`` +
               ``to_topic``, at-least-once, commit every second;
* ``bytewax``  Bytewax: ``KafkaSource`` -> ``map`` -> ``KafkaSink`` (one worker; it keeps its
               offsets in its own recovery store, not in Kafka: no commits).

Steady events/s and CPU per event are taken between 10 % and 90 % of the outputs (start-up,
group join and the tail excluded): the bench polls the output topic's high watermarks and the
process's CPU time (``/proc/PID/stat``, all threads) every 0.1 s.

``python bench/peers.py --run SYSTEM ...`` runs one system (what the bench starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("unit_price", "category", "payment_method", "account_age_days")
SYSTEMS = ("stream", "plain", "quix", "bytewax")
CATEGORIES = ("books", "electronics", "home", "toys", "fashion", "garden", "sports", "beauty", "food", "auto")
PAYMENTS = ("card", "paypal", "gift_card", "bank_transfer")


def purchases(n: int, seed: int = 17) -> Iterator[tuple[bytes, bytes]]:
    """``n`` purchase events (key, JSON value) under the purchase contract; the quantity
    depends on price, category and account age (something to learn)."""
    rng = random.Random(seed)
    ts = 1_700_000_000_000
    for i in range(n):
        ts += rng.randint(1, 40)
        cat = rng.randrange(len(CATEGORIES))
        price = round(rng.lognormvariate(3.0, 0.8), 2)
        age = float(rng.randint(0, 3000))
        q = max(1, min(50, round(1 + 8 / (1 + price / 20) + cat % 3 + age / 1500 + rng.gauss(0, 1))))
        user = f"u{rng.randrange(50_000)}"
        item = f"i{rng.randrange(5000)}"
        doc = {"event_id": f"e{i}", "ts": ts, "order_id": f"o{i}", "user_id": user, "item_id": item,
               "quantity": q, "unit_price": price, "category": CATEGORIES[cat],
               "payment_method": PAYMENTS[rng.randrange(len(PAYMENTS))], "country": "US", "shipping_country": "US",
               "account_age_days": age, "device_id": f"d{rng.randrange(80_000)}"}  # fmt: skip
        yield user.encode(), json.dumps(doc, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the model (plain, quix, bytewax)


def river_model() -> Any:
    from river import linear_model, optim, preprocessing

    return preprocessing.StandardScaler() | linear_model.LinearRegression(l2=0.001, optimizer=optim.SGD(0.01))


def features(doc: dict[str, Any]) -> dict[str, float]:
    """What ``stream``'s configured learner makes of the same fields: numbers as they are,
    strings one-hot."""
    x: dict[str, float] = {}
    for k in FEATURES:
        v = doc.get(k)
        if isinstance(v, str):
            x[f"{k}={v}"] = 1.0
        elif isinstance(v, (int, float)):
            x[k] = float(v)
    return x


def predictor(name: str) -> Callable[[dict[str, Any], str, int, int], dict[str, Any]]:
    """Test-then-train on one decoded event; returns the output envelope (as ``stream``'s)."""
    model = river_model()
    predict_one, learn_one = model.predict_one, model.learn_one

    def step(doc: dict[str, Any], topic: str, partition: int, offset: int) -> dict[str, Any]:
        x = features(doc)
        y = predict_one(x)
        learn_one(x, float(doc["quantity"]))
        return {"event_id": doc.get("event_id", ""), "source": {"topic": topic, "partition": partition,
                "offset": offset}, "learner": name, "model_version": 0, "prediction": {"value": float(y)},
                "predicted_at": int(time.time() * 1000)}  # fmt: skip

    return step


# --------------------------------------------------------------------------- the systems (each in its own process)


def run_plain(bootstrap: str, topic: str, out: str, group: str) -> None:
    from confluent_kafka import Consumer, Producer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})  # fmt: skip
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
                         "compression.type": "lz4"})  # fmt: skip
    consumer.subscribe([topic])
    step = predictor("basket_size")
    stop = _stop_flag()
    next_commit = time.monotonic() + 1.0
    while not stop():
        for msg in consumer.consume(1000, 0.2):
            if msg.error() is not None:
                continue
            try:
                doc = json.loads(msg.value())  # type: ignore[arg-type]
                value = json.dumps(step(doc, topic, msg.partition(), msg.offset())).encode()  # type: ignore[arg-type]
            except (ValueError, KeyError, TypeError):
                continue
            while True:
                try:
                    producer.produce(out, value, msg.key())
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)
        if time.monotonic() >= next_commit:
            producer.flush()  # at-least-once: outputs acknowledged before their offsets are committed
            consumer.commit(asynchronous=False)
            next_commit = time.monotonic() + 1.0
    producer.flush()
    consumer.close()


def run_quix(bootstrap: str, topic: str, out: str, group: str) -> None:
    from quixstreams import Application

    app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                      commit_interval=1.0, processing_guarantee="at-least-once", loglevel="WARNING")  # fmt: skip
    src = app.topic(topic, value_deserializer="json")
    dst = app.topic(out, value_serializer="json")
    step = predictor("basket_size")
    sdf = app.dataframe(src)
    # The envelope names its source as stream's does (topic, partition, offset from the message context).
    from quixstreams import message_context

    def apply(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = message_context()
        return step(doc, topic, ctx.partition, ctx.offset)

    sdf = sdf.apply(apply)
    sdf.to_topic(dst)
    app.run()


def bytewax_flow(bootstrap: str, topic: str, out: str, group: str) -> Any:
    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
    from bytewax.dataflow import Dataflow

    step = predictor("basket_size")
    flow = Dataflow("peers")
    src = op.input("in", flow, KafkaSource([bootstrap], [topic], add_config={"group.id": group}, batch_size=1000))

    def apply(msg: Any) -> Any:
        doc = json.loads(msg.value)
        value = json.dumps(step(doc, topic, msg.partition, msg.offset)).encode()
        return KafkaSinkMessage(msg.key, value)

    op.output("out", op.map("model", src, apply), KafkaSink([bootstrap], out, add_config={"linger.ms": "5"}))
    return flow


def run_bytewax(bootstrap: str, topic: str, out: str, group: str) -> None:
    from bytewax.run import cli_main

    cli_main(bytewax_flow(bootstrap, topic, out, group), workers_per_process=1)


def _stop_flag() -> Callable[[], bool]:
    flag = [False]

    def set_flag(*_: Any) -> None:
        flag[0] = True

    signal.signal(signal.SIGTERM, set_flag)
    signal.signal(signal.SIGINT, set_flag)
    return lambda: flag[0]


# --------------------------------------------------------------------------- the orchestration


def stream_config(bootstrap: str, topic: str, out: str, group: str, prefix: str, tmp: Path) -> Path:
    with socket.socket() as s:  # a free port: /metrics is served, as in production
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / f"{prefix}.toml"
    cfg.write_text(
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\ngroup_id = "{group}"\n\n'
        f'[topics]\npurchases = "{topic}"\nclicks = "{prefix}-clicks"\nprices = "{prefix}-prices"\n'
        f'fraud_labels = "{prefix}-fraud-labels"\ndead_letters = "{prefix}-dead-letters"\npartitions = 3\n\n'
        f'[metrics]\nport = {port}\nhost = "127.0.0.1"\n\n'
        f'[checkpoints]\ndir = "{tmp / "checkpoints"}"\n\n'
        "[learners.basket_size]\n"
        f'kind = "custom"\ninput = "purchases"\noutput_topic = "{out}"\nlabel = "quantity"\ntask = "regression"\n'
        f"features = {json.dumps(list(FEATURES))}\n"
        'model = [\n  { class = "preprocessing.StandardScaler" },\n'
        '  { class = "linear_model.LinearRegression", params = { l2 = 0.001, optimizer = { class = "optim.SGD", '
        "params = { lr = 0.01 } } } },\n]\n"
    )
    return cfg


def process_cpu_s(pid: int) -> float:
    """User + system CPU time of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *cmd] if shutil.which("taskset") else cmd


def available(system: str) -> bool:
    if system in ("stream", "plain"):
        return True
    module = {"quix": "quixstreams", "bytewax": "bytewax.run"}[system]
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def run_one(
    system: str, bootstrap: str, topic: str, n: int, tmp: Path, timeout_s: float = 600.0, baseline: Path | None = None
) -> dict[str, Any]:
    """Run one system over the input topic; steady events/s and CPU per event between 10 % and
    90 % of the outputs. ``stream-base`` is ``stream run`` from the source tree ``baseline``
    (``git archive <commit> | tar -x -C DIR``): a before/after comparison in the same run."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from kafka_broker import create_topics

    prefix = f"peer-{system}-{uuid.uuid4().hex[:6]}"
    out, group = f"{prefix}-out", f"{prefix}-group"
    create_topics(bootstrap, [out], partitions=3)
    cwd = ROOT
    if system == "stream-base":
        assert baseline is not None
        cwd = baseline  # `python -m stream` imports the package from the working directory first
    if system.startswith("stream"):
        create_topics(bootstrap, [f"{prefix}-dead-letters"], partitions=3)
        cfg = stream_config(bootstrap, topic, out, group, prefix, tmp)
        cmd = [sys.executable, "-m", "stream", "run", "--config", str(cfg)]
    else:
        cmd = [sys.executable, str(Path(__file__)), "--run", system, "--bootstrap", bootstrap, "--topic", topic,
               "--out", out, "--group", group]  # fmt: skip
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-watch"})
    parts = [TopicPartition(out, p) for p in range(3)]

    last = [0]

    def outputs() -> int:
        # A new topic's leader not known yet: the count so far.
        with contextlib.suppress(KafkaException):
            last[0] = sum(watcher.get_watermark_offsets(tp, timeout=5, cached=False)[1] for tp in parts)
        return last[0]

    log = open(tmp / f"{prefix}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(_pinned(cmd), cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
    samples: list[tuple[float, float, int]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{system} exited with {proc.returncode}; see {tmp / f'{prefix}.log'}")
            samples.append((time.perf_counter(), process_cpu_s(proc.pid), outputs()))
            if samples[-1][2] >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system} did not finish in {timeout_s:.0f}s; see {tmp / f'{prefix}.log'}")
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        watcher.close()
        log.close()
    lo = next(s for s in samples if s[2] >= 0.1 * n)
    hi = next(s for s in samples if s[2] >= 0.9 * n)
    events = hi[2] - lo[2]
    return {"events_per_s": events / (hi[0] - lo[0]), "cpu_us_per_event": (hi[1] - lo[1]) / events * 1e6,
            "outputs": samples[-1][2]}  # fmt: skip


def model_alone(n: int) -> dict[str, Any]:
    """The River model alone on decoded dicts (features made, predict, learn): the floor."""
    docs = [json.loads(v) for _, v in purchases(n)]
    model = river_model()
    predict_one, learn_one = model.predict_one, model.learn_one
    c0, t0 = time.process_time(), time.perf_counter()
    for doc in docs:
        x = features(doc)
        predict_one(x)
        learn_one(x, float(doc["quantity"]))
    t, c = time.perf_counter() - t0, time.process_time() - c0
    return {"events_per_s": n / t, "cpu_us_per_event": c / n * 1e6}


def bench_peers(
    bootstrap: str,
    n: int,
    rounds: int,
    tmp: Path,
    log: Callable[[str], None],
    baseline: Path | None = None,
    only: Sequence[str] = SYSTEMS,
) -> dict[str, Any]:
    from confluent_kafka import Producer
    from kafka_broker import create_topics

    systems = [s for s in SYSTEMS if s in only and available(s)]
    if baseline is not None:
        systems.insert(1, "stream-base")
    missing = [s for s in SYSTEMS if s in only and s not in systems]
    if missing:
        log(f"peers: not installed, skipped: {', '.join(missing)} (pip install -e '.[bench]')")
    topic = f"peers-{uuid.uuid4().hex[:6]}-purchases"
    create_topics(bootstrap, [topic], partitions=3)
    # Current Kafka timestamps (the producer's clock); the event time is the payload's `ts`.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
                         "queue.buffering.max.messages": 500_000})  # fmt: skip
    for key, value in purchases(n):
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(120) == 0
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(rounds):
        # Alternate the order between rounds so no system always runs first (a cold broker page cache).
        for system in systems if r % 2 == 0 else systems[::-1]:
            res = run_one(system, bootstrap, topic, n, tmp, baseline=baseline)
            runs[system].append(res)
            log(f"peers round {r + 1}: {system:8s} {res['events_per_s']:9,.0f} events/s  "
                f"{res['cpu_us_per_event']:6.1f} µs CPU/event")  # fmt: skip
    alone = model_alone(n)
    table: dict[str, Any] = {}
    for system, rs in runs.items():
        table[system] = {
            "events_per_s": _median([x["events_per_s"] for x in rs]),
            "cpu_us_per_event": _median([x["cpu_us_per_event"] for x in rs]),
            "rounds": rs,
        }
    table["model_alone"] = alone
    result: dict[str, Any] = {"peers_events": n, "peers_rounds": rounds, "peers": table}
    ratios: dict[str, Any] = {}
    for other in ("plain", "quix", "bytewax", "stream-base"):
        if "stream" in runs and other in runs:
            pairs = zip(runs["stream"], runs[other], strict=True)
            per_round = [a["events_per_s"] / b["events_per_s"] for a, b in pairs]
            ratios[f"stream/{other}"] = {"median": _median(per_round), "per_round": per_round}
    result["peers_ratios"] = ratios
    log("peers (median of rounds; pinned to one core each; same broker, same input topic):")
    log(f"  {'system':12s} {'events/s':>10s} {'CPU µs/event':>13s}")
    for system, row in table.items():
        log(f"  {system:12s} {row['events_per_s']:10,.0f} {row['cpu_us_per_event']:13.1f}")
    targets = {"stream/plain": 1.0, "stream/quix": 1.5}
    for name, r in ratios.items():
        target = targets.get(name)
        verdict = f" (target >= {target}: {'met' if r['median'] >= target else 'missed'})" if target else ""
        log(f"  ratio {name}: {r['median']:.2f}{verdict}; per round {[round(x, 2) for x in r['per_round']]}")
    if "stream" in table:
        outside = table["stream"]["cpu_us_per_event"] - alone["cpu_us_per_event"]
        result["peers_stream_cpu_us_outside_model"] = outside
        log(f"  stream CPU per event outside the model: {outside:.1f} µs (target <= 25)")
    return result


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run one system of the peers bench")
    p.add_argument("--run", choices=[s for s in SYSTEMS if s != "stream"], required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--group", required=True)
    args = p.parse_args(argv)
    {"plain": run_plain, "quix": run_quix, "bytewax": run_bytewax}[args.run](args.bootstrap, args.topic, args.out,
                                                                            args.group)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
