"""A real single-node KRaft Apache Kafka broker for tests and benchmarks, run from Maven jars.

No Docker needed: ``tests/kafka/pom.xml`` resolves Apache Kafka's jars from Maven Central into
``.kafka-jars/lib`` (once, cached) and :class:`KafkaBroker` runs ``kafka.Kafka`` in a JVM with
broker and controller in one process. See ``/work/shared/docs/kafka-broker-from-maven.md``.

Run ``python tests/kafka_broker.py`` to start a broker in the foreground (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

KAFKA_VERSION = "4.1.1"
KAFKA_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"
DOCKER_IMAGE = f"apache/kafka:{KAFKA_VERSION}"
REPO_ROOT = Path(__file__).resolve().parent.parent
POM_DIR = Path(__file__).resolve().parent / "kafka"
LOG4J2_CONFIG = POM_DIR / "log4j2.xml"
DEFAULT_CACHE_DIR = REPO_ROOT / ".kafka-jars"
HOST = "127.0.0.1"
MESSAGE_MAX_BYTES = 10 * 1024 * 1024
JVM_OPTS = ("-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true")
_RESOLVED_MARKER = f".resolved-{KAFKA_VERSION}"
_LIVE_BROKERS: weakref.WeakSet[KafkaBroker] = weakref.WeakSet()


class KafkaUnavailableError(RuntimeError):
    """A tool the jar broker needs (java, mvn) or its jars cannot be had on this machine."""


class KafkaBrokerError(RuntimeError):
    """The broker failed to format, start or stop."""


# --------------------------------------------------------------------------- jars


def require_tool(name: str) -> str:
    """Path of executable ``name``, or KafkaUnavailableError naming what is missing."""
    path = shutil.which(name)
    if path is None:
        what = "Java 17+ (java)" if name == "java" else "Apache Maven (mvn)"
        raise KafkaUnavailableError(f"{what} not found on PATH: needed to run the jar-based Kafka broker for tests")
    return path


def _jars_ready(lib_dir: Path) -> bool:
    return (lib_dir / KAFKA_JAR).is_file() and (lib_dir / _RESOLVED_MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_maven(lib_dir: Path) -> None:
    mvn = require_tool("mvn")
    cmd = [mvn, "-B", "-q", "-f", str(POM_DIR / "pom.xml"), "package", f"-Dkafka.lib.dir={lib_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise KafkaUnavailableError(f"could not resolve Kafka jars with Maven ({' '.join(cmd)}):\n{output}")


def resolve_jars(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Resolve Kafka's jars into ``cache_dir/lib`` with Maven (once) and return that folder.

    Safe to call concurrently (an flock on ``cache_dir/.lock``); a marker file written after a
    successful ``mvn package`` makes later calls return at once.
    """
    require_tool("java")
    lib_dir = cache_dir.resolve() / "lib"
    if _jars_ready(lib_dir):
        return lib_dir
    with _file_lock(cache_dir / ".lock"):
        if not _jars_ready(lib_dir):
            _run_maven(lib_dir)
            if not (lib_dir / KAFKA_JAR).is_file():
                raise KafkaUnavailableError(f"Maven ran but {lib_dir / KAFKA_JAR} is missing")
            (lib_dir / _RESOLVED_MARKER).write_text(f"{KAFKA_VERSION}\n")
    return lib_dir


# --------------------------------------------------------------------------- configuration


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def random_cluster_id() -> str:
    """A KRaft cluster id: base64url of 16 random bytes, without padding (22 chars).

    Never starting with ``-``: StorageTool would parse it as an option."""
    while True:
        cid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


def single_node_properties(
    port: int, controller_port: int, log_dir: Path | None = None, host: str = HOST
) -> dict[str, str]:
    """server.properties of a combined broker+controller node tuned for fast tests."""
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "message.max.bytes": str(MESSAGE_MAX_BYTES),
        "replica.fetch.max.bytes": str(MESSAGE_MAX_BYTES),
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    if log_dir is not None:
        props["log.dirs"] = str(log_dir)
    return props


def write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))


def broker_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when a Kafka broker at ``bootstrap`` returns cluster metadata within ``timeout``."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return bool(metadata.brokers)


# --------------------------------------------------------------------------- broker


class KafkaBroker:
    """A single-node KRaft Kafka broker (broker + controller in one JVM) on 127.0.0.1.

    Ports and the data directory are chosen at the first :meth:`start` and kept for its life, so
    :meth:`restart` comes back at the same bootstrap address with the same data.
    """

    def __init__(
        self,
        lib_dir: Path | None = None,
        data_dir: Path | None = None,
        extra_properties: Mapping[str, str] | None = None,
        startup_timeout: float = 120.0,
        jvm_opts: Iterable[str] = JVM_OPTS,
    ) -> None:
        self._lib_dir = lib_dir
        self._data_dir = data_dir
        self._owns_data_dir = data_dir is None
        self._extra = dict(extra_properties or {})
        self.startup_timeout = startup_timeout
        self._jvm_opts = list(jvm_opts)
        self._port: int | None = None
        self._controller_port: int | None = None
        self._cluster_id = random_cluster_id()
        self._formatted = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._paused = False

    # -- properties

    @property
    def bootstrap_servers(self) -> str:
        if self._port is None:
            raise KafkaBrokerError("broker has not been started yet")
        return f"{HOST}:{self._port}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise KafkaBrokerError("broker has not been started yet")
        return self._data_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def is_paused(self) -> bool:
        return self._paused and self.is_running

    # -- lifecycle

    def start(self) -> KafkaBroker:
        """Start the broker (format storage the first time) and wait until it answers."""
        if self.is_running:
            return self
        if self._lib_dir is None:
            self._lib_dir = resolve_jars()
        self._prepare_data_dir()
        if self._port is None:
            self._start_on_fresh_ports()
        else:
            self._launch_and_wait()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM); SIGKILL if the JVM is still alive after ``timeout``."""
        if not self.is_running:
            self._reap()
            return
        self.resume()
        self._signal(signal.SIGTERM)
        self._wait_or_kill(timeout)

    def kill(self) -> None:
        """Crash the broker (SIGKILL, no controlled shutdown)."""
        if self.is_running:
            self._signal(signal.SIGKILL)
        self._wait_or_kill(10.0)

    def restart(self, stop_timeout: float = 30.0) -> None:
        """Stop, then start again on the same ports and data directory (no reformat)."""
        self.stop(stop_timeout)
        self.start()

    def pause(self) -> None:
        """Freeze the JVM (SIGSTOP): sockets stay open, nothing answers."""
        if not self.is_running:
            raise KafkaBrokerError("cannot pause a broker that is not running")
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Unfreeze a paused JVM (SIGCONT)."""
        if self._paused and self.is_running:
            self._signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the broker and delete its data directory if this object created it."""
        self.stop()
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._formatted = False

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self.is_paused else "running" if self.is_running else "stopped"
        address = f"{HOST}:{self._port}" if self._port else "-"
        return f"KafkaBroker({address}, {state}, pid={self.pid})"

    # -- internals

    def _prepare_data_dir(self) -> None:
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="kafka-broker-"))
            self._owns_data_dir = True
        self._data_dir.mkdir(parents=True, exist_ok=True)

    def _start_on_fresh_ports(self, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            self._port, self._controller_port = free_port(), free_port()
            try:
                self._launch_and_wait()
                return
            except KafkaBrokerError as error:
                if attempt == attempts or "Address already in use" not in str(error):
                    raise

    def _properties(self) -> dict[str, str]:
        assert self._port is not None and self._controller_port is not None
        props = single_node_properties(self._port, self._controller_port, self.data_dir / "kraft")
        props.update(self._extra)
        return props

    def _java(self, main_class: str, *args: str, heap: Iterable[str] = ()) -> list[str]:
        return [
            require_tool("java"),
            *heap,
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            f"{self._lib_dir}/*",
            main_class,
            *args,
        ]

    def _format_storage(self) -> None:
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self._cluster_id,
            "-c",
            str(self.properties_file),
            "--ignore-formatted",
            heap=("-Xmx256m",),
        )
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"formatting Kafka storage failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}"
            )
        self._formatted = True

    def _launch_and_wait(self) -> None:
        write_properties(self.properties_file, self._properties())
        if not self._formatted:
            self._format_storage()
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._log_handle = self.log_file.open("ab")
        cmd = self._java("kafka.Kafka", str(self.properties_file), heap=self._jvm_opts)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal goes to us, not straight to the JVM
        )
        self._paused = False
        _LIVE_BROKERS.add(self)
        self._wait_until_ready(log_offset)

    def _wait_until_ready(self, log_offset: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.is_running:
                self._fail_start("the broker JVM exited during startup", log_offset)
            if broker_answers(self.bootstrap_servers, timeout=2.0):
                return
            time.sleep(0.2)
        self.kill()
        self._fail_start(f"the broker did not answer within {self.startup_timeout:.0f}s", log_offset)

    def _fail_start(self, reason: str, log_offset: int) -> None:
        self._reap()
        log = self.log_file.read_bytes()[log_offset:].decode(errors="replace")[-4000:]
        raise KafkaBrokerError(f"{reason} ({self.bootstrap_servers}, log {self.log_file}):\n{log}")

    def _signal(self, signum: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signum)

    def _wait_or_kill(self, timeout: float) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait(10.0)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None and self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        self._paused = False


@atexit.register
def _stop_live_brokers() -> None:
    """Never leave a JVM behind when the interpreter exits without closing its brokers."""
    for broker in list(_LIVE_BROKERS):
        with contextlib.suppress(Exception):
            broker.close()


# --------------------------------------------------------------------------- Docker (optional)


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker engine answers a ping within ``timeout`` (never raises)."""
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=int(max(1, timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure just means "no Docker"
        return False


def _docker_env(props: Mapping[str, str]) -> dict[str, str]:
    """apache/kafka image convention: KAFKA_ + name, '.' -> '_', '_' -> '__', '-' -> '___'."""

    def env_name(key: str) -> str:
        return "KAFKA_" + key.replace("-", "___").replace("_", "__").replace(".", "_").upper()

    return {env_name(key): value for key, value in props.items()}


@contextlib.contextmanager
def docker_kafka(image: str = DOCKER_IMAGE, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run ``apache/kafka`` with testcontainers and yield its bootstrap address.

    testcontainers' own KafkaContainer drives Confluent images only, so this configures the
    official image through KAFKA_* environment variables with the same single-node properties
    as :class:`KafkaBroker`; the host port equals the container port so the advertised
    listener is right.
    """
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = DockerContainer(image)
    host = container.get_docker_client().host()
    props = single_node_properties(port, 9093, host="localhost")
    props["listeners"] = f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://localhost:9093"
    props["advertised.listeners"] = f"PLAINTEXT://{host}:{port}"
    container.with_envs(CLUSTER_ID=random_cluster_id(), **_docker_env(props))
    container.with_bind_ports(port, port)
    with container:
        bootstrap = f"{host}:{port}"
        deadline = time.monotonic() + startup_timeout
        while not broker_answers(bootstrap):
            if time.monotonic() > deadline:
                logs = b"".join(container.get_logs()).decode(errors="replace")[-4000:]
                raise KafkaBrokerError(f"{image} did not answer at {bootstrap}:\n{logs}")
            time.sleep(0.5)
        yield bootstrap


# --------------------------------------------------------------------------- topics


def unique_topics(*names: str, prefix: str = "t") -> list[str]:
    """Topic names unique to this call: ``<prefix>-<name>-<8 hex>`` (Kafka-legal characters)."""
    suffix = uuid.uuid4().hex[:8]
    clean = re.sub(r"[^a-zA-Z0-9._-]+", "-", prefix).strip("-")[:150] or "t"
    return [f"{clean}-{name}-{suffix}" for name in names]


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Create topics (replication factor 1) and wait until the broker has created all of them."""
    names = list(names)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(name, num_partitions=partitions, replication_factor=1, config=dict(config or {})) for name in names]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    for future in futures.values():
        future.result(timeout)
    # The controller has created them; the broker's metadata (what a new client lists) may lag on a
    # loaded machine: wait until it lists every one.
    deadline = time.monotonic() + timeout
    while not set(names) <= set(admin.list_topics(timeout=timeout).topics) and time.monotonic() < deadline:
        time.sleep(0.05)


# --------------------------------------------------------------------------- main


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a single-node KRaft Kafka broker.")
    parser.add_argument("--data-dir", type=Path, help="keep data here (default: a temp dir)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)  # even if started with SIGINT ignored
    started = time.monotonic()
    broker = KafkaBroker(data_dir=args.data_dir)
    try:
        broker.start()
        print(broker.bootstrap_servers, flush=True)
        print(
            f"# KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers} (up in "
            f"{time.monotonic() - started:.1f}s, pid {broker.pid}, log {broker.log_file}); "
            "Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        while broker.is_running:
            time.sleep(1.0)
        print(f"broker exited; see {broker.log_file}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.close()


if __name__ == "__main__":
    sys.exit(main())
