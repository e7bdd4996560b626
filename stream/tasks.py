"""Tasks: the unit of scale-out, and how the consumer group spreads them.

A *task* is one partition number of the topics the learners read together:
task ``p`` is partition ``p`` of every per-task input topic (clicks, purchases,
searches ... all keyed by ``user_id``, so one user's events are in one task).
The topics one learner reads must be co-partitioned (the same partition count
and key): otherwise a user's clicks and purchases would land in different
tasks, and the start is refused with an error naming each topic and its count.
Learners reading unrelated topics may differ; the task count ``P`` is the
largest partition count, and task ``p`` reads the topics that have a partition
``p`` (the others' learners idle in it).

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
from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from stream.config import Config
from stream.errors import StateError
from stream.kafka import TP, admin_config

__all__ = ["TaskAssignment", "ensure_tasks_topic", "global_topics", "task_count", "tasks_topic"]

log = logging.getLogger(__name__)



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


def task_count(counts: Mapping[str, int], reads: Mapping[str, Iterable[str]]) -> int:
    """The task count (the largest partition count among ``counts``, topic -> partitions,
    of the per-task topics) once every learner's topics (``reads``: learner -> its
    per-task topics) are co-partitioned; ``StateError`` naming the learner, every topic
    and its count when they are not.

    >>> task_count({"clicks": 4, "purchases": 4, "events": 2}, {"rec": ["clicks", "purchases"], "x": ["events"]})
    4
    >>> task_count({}, {"prices": []})  # every input a global table: one task
    1
    >>> task_count({"clicks": 4, "purchases": 3}, {"rec": ["clicks", "purchases"]})
    Traceback (most recent call last):
    ...
    stream.errors.StateError: learner `rec` reads topics that are not co-partitioned: clicks has 4 partitions, ...
    """
    for learner, topics in reads.items():
        mine = {t: counts[t] for t in topics}
        if len(set(mine.values())) > 1:
            listed = ", ".join(f"{t} has {n} partitions" for t, n in sorted(mine.items()))
            raise StateError(
                f"learner `{learner}` reads topics that are not co-partitioned: {listed}. A task is one "
                "partition number of them (one user's events in one task), so they need the same partition "
                "count and the same key (user_id). Repartition the odd ones (more partitions, then re-key) "
                "or read them in different consumer groups."
            )
    return max(counts.values(), default=1)


class TaskAssignment:
    """Which input partitions make each task, and which partitions of the global tables it
    publishes (``q mod P``) or only learns.

    >>> a = TaskAssignment({"clicks": 2, "purchases": 2, "events": 1}, 2, {"prices": 3})
    >>> a.partitions(0)
    [('clicks', 0), ('events', 0), ('purchases', 0)]
    >>> a.committed(1), a.silent(1)
    ([('clicks', 1), ('purchases', 1), ('prices', 1)], [('prices', 0), ('prices', 2)])
    >>> sorted(a.tasks_in([TopicPartition("g.tasks", 1), TopicPartition("g.tasks", 3)], "g.tasks"))
    [1, 3]
    """

    def __init__(self, counts: Mapping[str, int], n_tasks: int, global_counts: Mapping[str, int] | None = None) -> None:
        self.counts = dict(sorted(counts.items()))
        self.n_tasks = n_tasks
        self.global_counts = dict(sorted((global_counts or {}).items()))

    def partitions(self, task: int) -> list[TP]:
        """The per-task input partitions of ``task``: partition ``task`` of every per-task topic that has it."""
        return [(t, task) for t, n in self.counts.items() if task < n]

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
