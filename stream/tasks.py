"""Tasks: the unit of scale-out, and how the consumer group spreads them.

A *task* is one partition number of the topics the learners read together:
task ``p`` is partition ``p`` of every per-task input topic (clicks, purchases,
searches ... all keyed by ``user_id``, so one user's events are in one task).
The task count ``P`` is their partition count; inputs with different counts
are not co-partitioned (a user's clicks and purchases would land in different
tasks) and the start is refused with an error naming each topic and its count.

The group's own protocol assigns the tasks, as Kafka Streams does: every
instance joins the consumer group on a *tasks topic* (``<group_id>.tasks``,
``P`` partitions, no records) with the cooperative-sticky assignor and static
membership (``group.instance.id``); the partitions of the tasks topic a member
is assigned are the tasks it runs. It then reads the input partitions of those
tasks (manual assignment) and commits their offsets through its group member,
so a deposed member's commits are refused for its stale generation. One task
(``P = 1``) is the former single-active lease: one instance works, the others
wait as standbys.

Topics read as a *global table* (``[coordination] global_topics``: prices keyed
by item, fraud labels keyed by order) are not split: every task reads all their
partitions and learns every record, like Kafka Streams' GlobalKTable; the task
``q mod P`` publishes the outputs of partition ``q`` and commits its offset, the
others learn it silently and keep their position in their checkpoints. They take
no part in the task count; with no per-task topic at all there is one task.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from stream.config import Config
from stream.errors import StateError
from stream.kafka import admin_config

__all__ = ["TaskAssignment", "ensure_tasks_topic", "global_topics", "task_count", "tasks_topic"]

log = logging.getLogger(__name__)

TP = tuple[str, int]


def tasks_topic(config: Config) -> str:
    """The topic whose partitions the group assigns as tasks: ``[coordination] tasks_topic`` or ``<group_id>.tasks``.

    >>> tasks_topic(Config())
    'stream.tasks'
    """
    name = config.coordination.tasks_topic or f"{config.kafka.group_id}.tasks"
    return re.sub(r"[^a-zA-Z0-9._-]+", "_", name)[:249] or "_"


def global_topics(config: Config, topics: Iterable[str]) -> set[str]:
    """Which of ``topics`` are read as a global table (``[coordination] global_topics``:
    stream names or topic names).

    >>> sorted(global_topics(Config(), ["clicks", "prices", "fraud-labels"]))
    ['fraud-labels', 'prices']
    """
    streams = config.input_topics()
    wanted = {streams.get(name, name) for name in config.coordination.global_topics}
    return {t for t in topics if t in wanted}


def task_count(counts: Mapping[str, int]) -> int:
    """The task count of co-partitioned inputs (topic -> partition count); ``StateError``
    naming every topic and its count when they differ.

    >>> task_count({"clicks": 4, "purchases": 4})
    4
    >>> task_count({})  # every input a global table: one task
    1
    >>> task_count({"clicks": 4, "purchases": 3})
    Traceback (most recent call last):
    ...
    stream.errors.StateError: the per-task input topics are not co-partitioned: clicks has 4 partitions, ...
    """
    if not counts:
        return 1
    distinct = set(counts.values())
    if len(distinct) == 1:
        return distinct.pop()
    listed = ", ".join(f"{t} has {n} partitions" for t, n in sorted(counts.items()))
    raise StateError(
        f"the per-task input topics are not co-partitioned: {listed}. A task is one partition number of all of "
        "them (one user's events in one task), so they need the same partition count and the same key "
        "(user_id). Repartition the odd ones (e.g. `kafka-topics --alter --partitions`, then re-key) or "
        "give them their own consumer group and configuration."
    )


class TaskAssignment:
    """Which input partitions make each task, and which partitions of the global tables it
    publishes (``q mod P``) or only learns.

    >>> a = TaskAssignment(["clicks", "purchases"], 2, {"prices": 3})
    >>> a.partitions(1)
    [('clicks', 1), ('purchases', 1)]
    >>> a.committed(1), a.silent(1)
    ([('clicks', 1), ('purchases', 1), ('prices', 1)], [('prices', 0), ('prices', 2)])
    >>> sorted(a.tasks_in([TopicPartition("g.tasks", 1), TopicPartition("g.tasks", 3)], "g.tasks"))
    [1, 3]
    """

    def __init__(self, topics: Sequence[str], n_tasks: int, global_counts: Mapping[str, int] | None = None) -> None:
        self.topics = sorted(topics)
        self.n_tasks = n_tasks
        self.global_counts = dict(sorted((global_counts or {}).items()))

    def partitions(self, task: int) -> list[TP]:
        """The per-task input partitions of ``task``, one per per-task topic."""
        return [(t, task) for t in self.topics]

    def committed(self, task: int) -> list[TP]:
        """What ``task`` publishes and commits: its partitions and the global ones it owns."""
        owned = [(t, q) for t, n in self.global_counts.items() for q in range(n) if q % self.n_tasks == task]
        return self.partitions(task) + owned

    def silent(self, task: int) -> list[TP]:
        """Global partitions ``task`` learns without publishing (another task owns them)."""
        return [(t, q) for t, n in self.global_counts.items() for q in range(n) if q % self.n_tasks != task]

    @staticmethod
    def tasks_in(parts: Iterable[TopicPartition], topic: str) -> set[int]:
        """The tasks among the tasks-topic partitions ``parts`` (a rebalance callback's argument)."""
        return {tp.partition for tp in parts if tp.topic == topic}


def ensure_tasks_topic(config: Config, topic: str, n_tasks: int, timeout_s: float = 20.0) -> None:
    """Create the tasks topic with ``n_tasks`` partitions, or grow it to that many (inputs
    repartitioned since). More partitions than tasks would assign tasks that do not exist:
    refused (``StateError``). Without permission to create or alter topics an operator's
    topic is used as it is, if its count is right."""
    admin = AdminClient(admin_config(config))
    spec = NewTopic(topic, num_partitions=n_tasks, replication_factor=config.topics.replication_factor)
    try:
        admin.create_topics([spec], request_timeout=15)[topic].result(timeout=timeout_s)
        log.info("tasks topic created", extra={"topic": topic, "tasks": n_tasks})
        return
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            log.warning("could not create the tasks topic", extra={"topic": topic, "reason": str(exc)})
    meta = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    have = len(meta.partitions) if meta is not None and meta.error is None else 0
    if have == n_tasks or have == 0:
        return
    if have > n_tasks:
        raise StateError(
            f"the tasks topic {topic} has {have} partitions but the inputs make {n_tasks} tasks: delete it "
            "(it holds no records) or set [coordination] tasks_topic to a new name"
        )
    try:
        admin.create_partitions([NewPartitions(topic, n_tasks)], request_timeout=15)[topic].result(timeout=timeout_s)
        log.info("tasks topic grown", extra={"topic": topic, "from": have, "tasks": n_tasks})
    except KafkaException as exc:
        raise StateError(f"cannot grow the tasks topic {topic} from {have} to {n_tasks} partitions: {exc}") from exc
