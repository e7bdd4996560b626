"""Harness for the fault tests: the pipeline as a real subprocess, a seeded input
feed, an in-process oracle, and checkers over what Kafka committed.

A :class:`Scenario` owns a set of unique topics, a config file, a checkpoint
directory and the logs of every process it starts. Inputs are two topics read
by two config-defined learners (a regression and a binary classifier), each
record a JSON object with a unique ``event_id``; a few undecodable records are
mixed in at known positions (they must be dead-lettered, never learned).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

#: Order-sensitive models (SGD): with one partition per topic the order is fixed and the final model must be equal.
SGD_MODELS = {
    "reg": '[{ class = "preprocessing.StandardScaler" }, { class = "linear_model.LinearRegression", '
           'params = { l2 = 0.001, optimizer = { class = "optim.SGD", params = { lr = 0.02 } } } }]',
    "clf": '[{ class = "preprocessing.StandardScaler" }, { class = "linear_model.LogisticRegression" }]',
}
#: Order-insensitive models (sufficient statistics): with several partitions per topic the interleaving
#: across partitions differs run to run, so the final model is compared up to float rounding.
STATS_MODELS = {
    "reg": '{ class = "dummy.StatisticRegressor", params = { statistic = { class = "stats.Mean" } } }',
    "clf": '{ class = "naive_bayes.GaussianNB" }',
}


def probes() -> list[dict[str, float]]:
    return [{"x1": x1 / 4, "x2": x2 / 4} for x1 in range(5) for x2 in range(5)]


def make_events(n: int, seed: int, bad_every: int = 0) -> list[tuple[str, bytes]]:
    """``n`` records alternating between streams ``a`` (regression) and ``b`` (binary);
    every ``bad_every``-th record is undecodable JSON."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        stream = "a" if i % 2 == 0 else "b"
        if bad_every and i % bad_every == bad_every - 1:
            out.append((stream, b'{"event_id": "bad-%d", "x1": ' % i))
            continue
        x1, x2 = rng.random(), rng.random()
        y: float | bool = 3 * x1 - 2 * x2 + rng.gauss(0, 0.1)
        if stream == "b":
            y = bool(y > 0.5)
        out.append((stream, json.dumps({"event_id": f"e{i}", "x1": x1, "x2": x2, "y": y}).encode()))
    return out


@dataclass
class Run:
    """One process of the pipeline."""

    proc: subprocess.Popen[bytes]
    log: Path
    instance: str
    fault: str | None
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"{self.instance} (fault {self.fault}) did not exit within {timeout}s; log tail:\n{tail(self.log)}"
            ) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def lines(self) -> list[dict[str, Any]]:
        return parse_log(self.log)

    def has(self, msg: str) -> bool:
        return any(line.get("msg") == msg for line in self.lines())

    def count(self, msg: str) -> int:
        return sum(line.get("msg") == msg for line in self.lines())

    def last_of(self, *msgs: str) -> str | None:
        """The latest of ``msgs`` logged so far (None when none was)."""
        return next((m for line in reversed(self.lines()) if (m := line.get("msg")) in msgs), None)


def _retry(call: Callable[[], T], timeout: float = 60.0) -> T:
    """The checkers run right after broker faults: retry what fails while the broker recovers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


def parse_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out


class Scenario:
    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        workdir: Path,
        *,
        guarantee: str = "at_least_once",
        partitions: int = 1,
        models: dict[str, str] = SGD_MODELS,
        session_timeout_ms: int = 6000,
        every_events: int = 300,
        extra: str = "",
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.workdir = workdir
        self.guarantee = guarantee
        self.partitions = partitions
        self.group = f"{prefix}-group"
        self.inputs = {"a": f"{prefix}-a", "b": f"{prefix}-b"}
        self.outputs = {"a": f"{prefix}-out-a", "b": f"{prefix}-out-b"}
        self.dlq = f"{prefix}-dlq"
        self.ckpt_dir = workdir / "checkpoints"
        self.config_path = workdir / "stream.toml"
        self.runs: list[Run] = []
        self.produced = 0
        self._feeder: threading.Thread | None = None
        self._feed_error: BaseException | None = None
        self._producer: Producer | None = None
        self._produce_lock = threading.Lock()
        self.write_config(models, session_timeout_ms, every_events, extra)
        self._create_topics()

    # -- setup

    def write_config(self, models: dict[str, str], session_timeout_ms: int, every_events: int, extra: str) -> None:
        self.config_path.write_text(f"""
[kafka]
bootstrap_servers = "{self.bootstrap}"
group_id = "{self.group}"

[kafka.consumer]
"session.timeout.ms" = {session_timeout_ms}
"heartbeat.interval.ms" = 1000

[topics]
dead_letters = "{self.dlq}"

[processing]
guarantee = "{self.guarantee}"
batch_size = 100
poll_timeout_s = 0.1
commit_interval_s = 0.2
shutdown_timeout_s = 10.0

[metrics]
port = 0

[checkpoints]
dir = "{self.ckpt_dir}"
every_events = {every_events}
every_seconds = 30.0
keep = 4
holdout_events = 200

[coordination]
transaction_timeout_ms = 10000
{extra}

[learners.reg]
kind = "custom"
input = "{self.inputs['a']}"
output_topic = "{self.outputs['a']}"
label = "y"
task = "regression"
features = ["x1", "x2"]
model = {models['reg']}

[learners.clf]
kind = "custom"
input = "{self.inputs['b']}"
output_topic = "{self.outputs['b']}"
label = "y"
task = "binary"
features = ["x1", "x2"]
model = {models['clf']}
""")

    def set_config(self, section_key: str, value: str) -> None:
        """Rewrite one ``key = value`` line of the config (e.g. ``on_missing``)."""
        key = section_key.split(".")[-1]
        text = self.config_path.read_text()
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
        out: list[str] = []
        section = "[" + section_key.rsplit(".", 1)[0] + "]"
        for ln in lines:
            out.append(ln)
            if ln.strip() == section:
                out.append(f"{key} = {value}")
        self.config_path.write_text("\n".join(out) + "\n")

    def _create_topics(self) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        names = [*self.inputs.values(), *self.outputs.values(), self.dlq]
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=self.partitions if n in self.inputs.values() else 1, replication_factor=1)
             for n in names], operation_timeout=30)
        for f in futures.values():
            f.result(30)

    # -- input

    def produce(self, events: Iterable[tuple[str, bytes]]) -> int:
        with self._produce_lock:
            return self._produce(events)

    def _produce(self, events: Iterable[tuple[str, bytes]]) -> int:
        if self._producer is None:
            self._producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True,
                                       "linger.ms": 5})
        producer = self._producer
        errors: list[Any] = []
        n = 0
        for stream, value in events:
            # Explicit partitions: the assignment of records to partitions is part of the test's determinism.
            producer.produce(self.inputs[stream], value, key=str(self.produced).encode(),
                             partition=self.produced % self.partitions,
                             on_delivery=lambda err, msg: errors.append(err) if err else None)
            self.produced += 1
            n += 1
        assert producer.flush(60) == 0 and not errors, errors
        return n

    def feed(self, events: list[tuple[str, bytes]], chunk: int = 100, interval_s: float = 0.05) -> None:
        """Produce ``events`` in the background, ``chunk`` records every ``interval_s``."""

        def run() -> None:
            try:
                started = time.monotonic()
                for n, i in enumerate(range(0, len(events), chunk)):
                    self.produce(events[i : i + chunk])
                    time.sleep(max(0.0, started + (n + 1) * interval_s - time.monotonic()))
            except BaseException as exc:
                self._feed_error = exc

        self._feeder = threading.Thread(target=run, daemon=True)
        self._feeder.start()

    def fed(self, timeout: float = 120.0) -> None:
        if self._feeder is not None:
            self._feeder.join(timeout)
            assert not self._feeder.is_alive(), "the feeder did not finish"
        if self._feed_error is not None:
            raise self._feed_error

    # -- processes

    def start(self, *, fault: str | None = None, instance: str = "a", env: dict[str, str] | None = None) -> Run:
        full = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
        full["STREAM_INSTANCE_ID"] = instance
        if fault:
            full["STREAM_FAULT_AT"] = fault
        full.update(env or {})
        log = self.workdir / f"run-{len(self.runs):02d}-{instance}.log"
        with open(log, "ab") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "stream", "run", "--config", str(self.config_path)],
                                    cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=stderr)
        run = Run(proc, log, instance, fault)
        self.runs.append(run)
        return run

    def crash_at(self, fault: str, timeout: float = 60.0) -> Run:
        """Run with ``STREAM_FAULT_AT=fault`` and assert the process really SIGKILLed itself there."""
        run = self.start(fault=fault)
        deadline = time.monotonic() + timeout
        extra = 0
        while run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            idle = self._feeder is None or not self._feeder.is_alive()
            if idle and time.monotonic() - run.started > 5 + 3 * extra:
                # The feed ran out before the armed point was reached: keep the stream going.
                extra += 1
                self.produce(make_events(200, seed=10_000 + len(self.runs) * 100 + extra))
        code = run.wait(max(deadline - time.monotonic(), 1.0))
        point = fault.split(":")[0]
        assert code == -signal.SIGKILL, f"{fault}: exit {code}, expected -9; log:\n{tail(run.log)}"
        assert any(ln.get("msg") == "fault injected" and ln.get("point") == point for ln in run.lines()), point
        return run

    def run_to_end(self, instance: str = "a", timeout: float = 90.0) -> Run:
        """Start, wait until every produced input is committed, SIGTERM, expect exit 0."""
        self.fed()
        run = self.start(instance=instance)
        self.wait_caught_up(run, timeout)
        self.wait_all_committed(timeout, run)
        code = run.stop()
        assert code == 0, f"clean stop exited {code}; log:\n{tail(run.log)}"
        return run

    def wait_caught_up(self, run: Run, timeout: float) -> None:
        """Until ``run`` is active and has relearned up to the committed offsets."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if run.proc.poll() is not None:
                raise AssertionError(f"the pipeline exited ({run.proc.returncode}); log:\n{tail(run.log)}")
            lines = run.lines()
            starts = [i for i, ln in enumerate(lines)
                      if ln.get("msg") in ("restored from checkpoint", "no checkpoint: starting untrained learners")]
            if starts:
                last = lines[starts[-1]]
                if int(last.get("relearn_without_publishing", 0)) == 0 or any(
                    str(ln.get("msg", "")).startswith("caught up") for ln in lines[starts[-1] :]
                ):
                    return
            time.sleep(0.2)
        raise AssertionError(f"{run.instance} did not catch up in {timeout}s; log:\n{tail(run.log)}")

    def wait_all_committed(self, timeout: float, run: Run | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if run is not None and run.proc.poll() is not None:
                raise AssertionError(f"the pipeline exited ({run.proc.returncode}); log:\n{tail(run.log)}")
            if self.committed() == self.end_offsets():
                return
            time.sleep(0.3)
        raise AssertionError(f"not all inputs committed in {timeout}s: {self.committed()} vs {self.end_offsets()}")

    # -- Kafka state

    def _tps(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in self.inputs.values() for p in range(self.partitions)]

    def committed(self) -> dict[tuple[str, int], int]:
        return _retry(self._committed)

    def _committed(self) -> dict[tuple[str, int], int]:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group, "enable.auto.commit": False,
                      "isolation.level": "read_committed"})
        try:
            return {(tp.topic, tp.partition): tp.offset for tp in c.committed(self._tps(), timeout=15)}
        finally:
            c.close()

    def end_offsets(self, topics: Iterable[str] | None = None) -> dict[tuple[str, int], int]:
        return _retry(lambda: self._end_offsets(topics))

    def _end_offsets(self, topics: Iterable[str] | None) -> dict[tuple[str, int], int]:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.prefix}-probe"})
        try:
            tps = self._tps() if topics is None else [TopicPartition(t, 0) for t in topics]
            return {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=15)[1] for tp in tps}
        finally:
            c.close()

    def read(self, topic: str, partitions: int = 1, timeout: float = 30.0) -> list[Message]:
        """Everything committed in ``topic`` (read_committed, up to the current end)."""
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.prefix}-reader-{time.monotonic_ns()}",
                      "enable.auto.commit": False, "isolation.level": "read_committed",
                      "enable.partition.eof": True})
        tps = [TopicPartition(topic, p, 0) for p in range(partitions)]
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=15)[1] for tp in tps}
        c.assign(tps)
        out: list[Message] = []
        done = {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + timeout
        try:
            while len(done) < len(tps) and time.monotonic() < deadline:
                for m in c.consume(1000, 0.5):
                    if m.error() is not None:
                        if m.error().code() == -191:  # _PARTITION_EOF: reached the stable end
                            done.add(m.partition())
                        continue
                    out.append(m)
        finally:
            c.close()
        assert len(done) == len(tps), f"could not read {topic} to its end"
        return out

    def inputs_in_order(self) -> dict[str, list[Message]]:
        """Input records per stream, partition by partition in offset order."""
        return {s: sorted(self.read(t, self.partitions), key=lambda m: (m.partition(), m.offset()))
                for s, t in self.inputs.items()}

    # -- checks

    def config(self) -> Any:
        from stream.config import load_config

        return load_config(self.config_path)

    def restored_checkpoint(self) -> Any:
        """The checkpoint a restart would restore now (offsets <= committed)."""
        from stream.state import CheckpointStore

        committed = self.committed()
        store = CheckpointStore.for_config(self.config())
        sel = store.select({k: (v if v >= 0 else None) for k, v in committed.items()}, dict.fromkeys(committed, 0))
        assert sel.checkpoint is not None, f"no restorable checkpoint: {sel.skipped}"
        return sel.checkpoint

    def oracle(self) -> list[Any]:
        """The learners trained once, uninterrupted, in-process, on the inputs in log order."""
        from stream.config import build_learners
        from stream.pipeline import Pipeline

        cfg = self.config()
        learners = build_learners(cfg)

        class Null:
            def produce(self, *a: Any, **k: Any) -> None:
                pass

        pipe = Pipeline(learners, Null(), contract_topics=cfg.input_topics(), dead_letter_topic="-")
        for msgs in self.inputs_in_order().values():
            for m in msgs:
                pipe.process(m)  # type: ignore[arg-type]
        return learners

    def assert_model_equals_oracle(self, learners: list[Any], exact: bool = True) -> None:
        oracle = {lr.name: lr for lr in self.oracle()}
        good = {s: sum(1 for m in msgs if not m.value().startswith(b'{"event_id": "bad'))
                for s, msgs in self.inputs_in_order().items()}
        assert {lr.name: lr.n_learned for lr in learners} == {"reg": good["a"], "clf": good["b"]}, \
            "every good input learned exactly once"
        for learner in learners:
            ref = oracle[learner.name]
            assert learner.n_learned == ref.n_learned
            for x in probes():
                got, want = learner.predict(dict(x)), ref.predict(dict(x))
                if exact:
                    assert got == want, (learner.name, x, got, want)
                else:
                    for k, v in want.items():
                        assert math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-12), (learner.name, x, got, want)

    def outputs_by_source(self) -> Counter[tuple[str, int, int]]:
        counts: Counter[tuple[str, int, int]] = Counter()
        for topic in self.outputs.values():
            for m in self.read(topic):
                src = json.loads(m.value())["source"]
                counts[(src["topic"], src["partition"], src["offset"])] += 1
        return counts

    def good_and_bad_inputs(self) -> tuple[set[tuple[str, int, int]], set[tuple[str, int, int]]]:
        good, bad = set(), set()
        for msgs in self.inputs_in_order().values():
            for m in msgs:
                key = (m.topic(), m.partition(), m.offset())
                (bad if m.value().startswith(b'{"event_id": "bad') else good).add(key)
        return good, bad

    def dead_letters_by_source(self) -> Counter[tuple[str, int, int]]:
        counts: Counter[tuple[str, int, int]] = Counter()
        for m in self.read(self.dlq):
            h = {k: v.decode() for k, v in m.headers() or []}
            counts[(h["stream.source.topic"], int(h["stream.source.partition"]), int(h["stream.source.offset"]))] += 1
        return counts

    def assert_exactly_once_outputs(self) -> None:
        """Every good input has exactly one committed prediction, every bad one exactly one dead letter."""
        good, bad = self.good_and_bad_inputs()
        outs = self.outputs_by_source()
        dups = {k: v for k, v in outs.items() if v != 1}
        assert not dups, f"{len(dups)} inputs with more than one committed prediction, e.g. {list(dups.items())[:3]}"
        assert set(outs) == good, f"missing {len(good - set(outs))}, unexpected {len(set(outs) - good)}"
        dead = self.dead_letters_by_source()
        assert set(dead) == bad and all(v == 1 for v in dead.values()), dead

    def assert_at_least_once_outputs(self) -> Counter[tuple[str, int, int]]:
        good, _ = self.good_and_bad_inputs()
        outs = self.outputs_by_source()
        assert good <= set(outs), f"{len(good - set(outs))} inputs without a prediction"
        return outs

    def aborted_records(self) -> int:
        """Records (and transaction markers) in the output log that read_committed does not show."""
        ends = self.end_offsets(self.outputs.values())
        visible = sum(len(self.read(t)) for t in self.outputs.values())
        return sum(ends.values()) - visible

    def logs(self) -> list[dict[str, Any]]:
        return [ln for run in self.runs for ln in run.lines()]

    def close(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait(10)
