"""Listing, exporting, importing, rolling back and signing the checkpointed models, offline.

The domain of ``stream model list | export | import | rollback | sign`` (the
parsers and handlers are in ``stream.cli``; these functions take typed
arguments). They work on the checkpoint directory of the configured group
while the service is stopped: a running instance keeps its model in memory and
its next checkpoints supersede anything written here. When the broker answers,
they refuse to touch a group with live members (``force`` overrides), and they
pick the checkpoint the service would restore (the best one with offsets <= the
committed offsets); offline (``offline`` or no broker) they use the newest
checkpoint that verifies.

Import and rollback never rewrite history: they write a *new* checkpoint with
the offsets of the one they start from, whose learners serve the imported (or
older) River model with a bumped ``model_version``. With ``[checkpoints]
validate = true`` the candidate is first scored against the current model on
the holdout of recent input records kept in the checkpoint; a candidate worse
by more than ``max_degradation`` is refused unless ``force``.

``list_models`` returns a ``Listing`` the caller prints; the others print their
report as they go and return an exit code (0, ``EXIT_REFUSED`` or
``EXIT_MISSING``); they raise ``StateError`` or ``CheckpointError`` when they
refuse (the CLI exits ``EXIT_REFUSED`` for those too).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
import pickle
import sys
from pathlib import Path
from typing import Any, Literal

import river
from river import base as river_base

from stream.checkpoint import Checkpoint, CheckpointInfo, Offsets, build, encode
from stream.checkpoint_topic import checkpoint_storage
from stream.config import Config, build_learners
from stream.state import (
    CheckpointError,
    CheckpointStore,
    IncompatibleCheckpoint,
    LocalStorage,
    StateError,
    describe_offsets,
    missing_state,
    read_any,
    swap_model,
)
from stream.validation import holdout_error

__all__ = [
    "EXIT_MISSING",
    "EXIT_REFUSED",
    "CheckpointError",
    "ExportFormat",
    "GroupAccess",
    "Listing",
    "StateError",
    "export_model",
    "import_model",
    "list_models",
    "rollback",
    "sign",
]

#: Exit codes: refused (validation, live group, incompatible), nothing to act on.
EXIT_REFUSED = 4
EXIT_MISSING = 5

ExportFormat = Literal["checkpoint", "pickle"]


@dataclasses.dataclass(frozen=True)
class GroupAccess:
    """How import and rollback treat the group: ``offline`` never contacts the broker (the newest
    valid checkpoint is the base); ``force`` acts on a group with live members and installs a
    candidate that holdout validation refuses."""

    offline: bool = False
    force: bool = False


def _store(config: Config) -> CheckpointStore:
    return CheckpointStore.for_config(config, instance_id="cli", storage=checkpoint_storage(config))


GroupState = tuple[dict[tuple[str, int], int | None], dict[tuple[str, int], int], int]


def _group_state(config: Config, timeout_s: float = 5.0) -> GroupState | None:
    """(committed, low watermarks, live members) of the configured group, or None when the broker does not answer."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient

    from stream.kafka import admin_config, consumer_config

    topics = sorted({t for lr in build_learners(config) for t in lr.reads})
    admin = AdminClient(admin_config(config) | {"error_cb": lambda e: None})
    try:
        meta = admin.list_topics(timeout=timeout_s)
        members = 0
        futures = admin.describe_consumer_groups([config.kafka.group_id], request_timeout=timeout_s)
        for future in futures.values():
            members = len(future.result(timeout=timeout_s).members)
    except KafkaException:
        return None
    tps = [(t, p) for t in topics if t in meta.topics for p in sorted(meta.topics[t].partitions)]
    consumer = Consumer(consumer_config(config, **{"error_cb": lambda e: None}))
    try:
        committed = {
            (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
            for tp in consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout_s)
        }
        low = {
            (t, p): max(consumer.get_watermark_offsets(TopicPartition(t, p), timeout=timeout_s)[0], 0) for t, p in tps
        }
    except KafkaException:
        return None
    finally:
        consumer.close()
    return committed, low, members


def _base(config: Config, store: CheckpointStore, access: GroupAccess) -> tuple[Checkpoint | None, Offsets | None]:
    """The checkpoint the service would restore, and the committed offsets (None offline).
    Refuses a group with live members (unless ``access.force``)."""
    state = None if access.offline else _group_state(config)
    if state is None:
        if not access.offline:
            print("note: broker not reachable; using the newest valid checkpoint", file=sys.stderr)
        return store.latest(), None
    committed, low, members = state
    if members and not access.force:
        raise StateError(
            f"group `{config.kafka.group_id}` has {members} live member(s): stop the service first (its in-memory "
            "model would supersede this change at its next checkpoint), or pass --force"
        )
    selection = store.select(committed, low)
    return selection.checkpoint, {k: v for k, v in committed.items() if v is not None}


def _fmt_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt_quality(quality: list[list[Any]]) -> str:
    rolling = [(m, v) for m, w, v in quality if w == "rolling"]
    return " ".join(f"{m}={v:.4g}" if isinstance(v, float) else f"{m}={v}" for m, v in rolling) or "-"


# --------------------------------------------------------------------------- list


@dataclasses.dataclass(frozen=True)
class Listing:
    """The group's checkpoints: ``(name, verified header or None, status)`` per file, and the one a
    start would restore (``online``: the committed offsets were known)."""

    location: str
    online: bool
    restorable: str | None
    rows: list[tuple[str, CheckpointInfo | None, str]]

    def json(self) -> str:
        doc = [
            {"name": n, "status": st, "restorable": n == self.restorable, **(i.header() if i is not None else {})}
            for n, i, st in self.rows
        ]
        return json.dumps(doc, indent=2, default=str)

    def text(self) -> str:
        offline = "" if self.online else " (offline: committed offsets unknown)"
        lines = [f"checkpoints in {self.location}{offline}"]
        if not self.rows:
            lines.append("  (none)")
        for name, info, status in self.rows:
            lines.extend(self._describe(name, info, status))
        if self.online:
            lines.append("* = the checkpoint a start would restore (offsets <= committed)")
        return "\n".join(lines)

    def _describe(self, name: str, info: CheckpointInfo | None, status: str) -> list[str]:
        if info is None:
            return [f"  ?      {name}  {status}"]
        mark = "*" if name == self.restorable else " "
        origin = f" origin={info.origin.get('action')}" if info.origin else ""
        signed = f"key={info.key_id}" if info.key_id else "unsigned"
        lines = [
            f"{mark} v{info.seq:<5} {_fmt_time(info.created_at)}  {info.reason}{origin}  {signed}  {status}  "
            f"offsets: {describe_offsets(info.offsets)}"
        ]
        for s in info.learners:
            lines.append(
                f"      {s['name']}: model_version={s['model_version']} n_learned={s['n_learned']} "
                f"rolling: {_fmt_quality(s.get('quality', []))}"
            )
        return lines


def _status(info: CheckpointInfo | None, error: str | None) -> str:
    if info is not None and error is not None:
        return f"REFUSED (not signed by the checkpoint key): {error}"
    if error is not None:
        return f"INVALID: {error}"
    if info is not None and info.versions.get("river") != river.__version__:
        return f"INCOMPATIBLE: river {info.versions.get('river')}"
    return "ok"


def list_models(config: Config, *, offline: bool = False) -> Listing:
    """Every checkpoint of the group, verified, and (with the broker) the one a start would restore."""
    store = _store(config)
    state = None if offline else _group_state(config)
    restorable: str | None = None
    if state is not None:
        try:
            chosen = store.select(state[0], state[1]).checkpoint
            restorable = chosen.info.name if chosen is not None else None
        except IncompatibleCheckpoint:
            restorable = None
    rows = [(name, info, _status(info, error)) for name, info, error in store.scan(verify=True)]
    return Listing(store.describe(), state is not None, restorable, rows)


# --------------------------------------------------------------------------- export


def export_model(
    config: Config,
    out: Path,
    *,
    version: int | None = None,
    learner: str | None = None,
    fmt: ExportFormat = "checkpoint",
) -> int:
    """Write checkpoint ``version`` (default: the newest valid) to ``out``: as a verified checkpoint
    file, or (``fmt="pickle"``, one ``learner``) its bare pickled River model."""
    store = _store(config)
    ckpt = store.load(store.by_seq(version)) if version is not None else store.latest()
    if ckpt is None:
        print(f"stream: no valid checkpoint in {store.describe()}", file=sys.stderr)
        return EXIT_MISSING
    learners = ckpt.learners
    if learner:
        chosen = ckpt.learner(learner)
        if chosen is None:
            raise StateError(
                f"checkpoint v{ckpt.info.seq} has no learner `{learner}` "
                f"(it has: {', '.join(lr.name for lr in learners)})"
            )
        learners = [chosen]
    if fmt == "pickle":
        data = _pickled_model(learners)
    else:
        _, data = build(
            out.name,
            ckpt.info.seq,
            learners,
            ckpt.info.offsets,
            reason="export",
            holdout=ckpt.holdout,
            origin={"action": "export", "from_version": ckpt.info.seq, "group_id": ckpt.info.group_id},
            group_id=ckpt.info.group_id,
            keys=store.keys,
        )
    LocalStorage(out.parent if str(out.parent) else ".").write(out.name, data)
    print(f"exported v{ckpt.info.seq} ({', '.join(lr.name for lr in learners)}) to {out} ({len(data)} bytes)")
    return 0


def _pickled_model(learners: list[Any]) -> bytes:
    if len(learners) != 1:
        raise StateError("--format pickle exports one River model: name it with --learner")
    model = getattr(learners[0], "model", None)
    if model is None:
        raise StateError(f"learner `{learners[0].name}` has no `model` attribute to export")
    return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)


# --------------------------------------------------------------------------- import / rollback


def _validate(config: Config, base: Checkpoint, current: Any, candidate: Any) -> tuple[bool, str]:
    """Score the candidate against the current learner on the checkpoint's holdout."""
    if not base.holdout:
        return True, "not validated: the checkpoint holds no holdout records ([checkpoints] holdout_events)"
    cur = holdout_error(current, base.holdout, config)
    new = holdout_error(candidate, base.holdout, config)
    if cur is None or new is None:
        return True, f"not validated: learner `{current.name}` offers no way to score its predictions"
    if new.failed > cur.failed:
        return False, (
            f"REFUSED: the candidate raised on {new.failed} of the holdout records (the current model on {cur.failed})"
        )
    if cur.n == 0 or new.n == 0 or math.isnan(cur.mean) or math.isnan(new.mean):
        failed = f"; the current learner raised on {cur.failed} records" if cur.failed else ""
        return True, f"not validated: no scored holdout records for learner `{current.name}`{failed}"
    margin = config.checkpoints.max_degradation
    ok = new.mean <= cur.mean + margin * abs(cur.mean) + 1e-12
    verdict = "accepted" if ok else f"REFUSED (worse by more than {margin:.0%})"
    return ok, f"holdout of {cur.n} records, mean error: current {cur.mean:.6g}, candidate {new.mean:.6g}: {verdict}"


def _check_restorable(config: Config, base: Checkpoint | None, learners: list[Any]) -> None:
    """Refuse learners this build's classes could not restore (the service would refuse them too)."""
    templates = {lr.name: lr for lr in build_learners(config)}
    for learner in learners:
        template = templates.get(learner.name)
        missing = missing_state(learner, template) if template is not None else []
        if missing:
            raise StateError(
                f"learner `{learner.name}` in checkpoint v{base.info.seq if base else '?'} lacks state this build's "
                f"{type(template).__name__} has ({', '.join(missing[:8])}): the service would refuse it; "
                "run the version that wrote it, or give the class a `__setstate__`"
            )


def _apply(
    config: Config,
    store: CheckpointStore,
    base: Checkpoint | None,
    start_offsets: Offsets,
    models: dict[str, Any],
    origin: dict[str, Any],
    *,
    force: bool,
    whole: bool = False,
) -> int:
    """Write a new checkpoint: ``base`` (or untrained learners) serving ``models``
    (River models; with ``whole``: whole learners, which replace the learners of that name)."""
    learners = copy.deepcopy(base.learners) if base is not None else build_learners(config)
    _check_restorable(config, base, learners)
    by_name = {lr.name: lr for lr in learners}
    refused = False
    for name, model in models.items():
        target = by_name.get(name)
        if target is None:
            raise StateError(f"no learner `{name}` is configured (learners: {', '.join(by_name)})")
        current = copy.deepcopy(target)
        if whole:
            target = _replace_learner(config, learners, target, model)
            by_name[name] = target
        else:
            swap_model(target, copy.deepcopy(model))
        if base is not None and config.checkpoints.validate:
            ok, message = _validate(config, base, current, target)
            print(f"{name}: {message}")
            refused = refused or not ok
        print(f"{name}: model_version {current.model_version} -> {target.model_version}")
    if refused and not force:
        print("stream: candidate refused by holdout validation (use --force to install it anyway)", file=sys.stderr)
        return EXIT_REFUSED
    holdout = base.holdout if base is not None else []
    info = store.write(learners, start_offsets, reason=origin["action"], holdout=holdout, origin=origin)
    print(
        f"wrote v{info.seq} ({info.name}) at offsets {describe_offsets(info.offsets) or '(beginning)'}; "
        "it serves from the next start"
    )
    return 0


def _replace_learner(config: Config, learners: list[Any], target: Any, learner: Any) -> Any:
    """Put a copy of ``learner`` in the place of ``target`` in ``learners``, its model version past both."""
    if type(learner) is not type(target):
        raise StateError(
            f"learner `{target.name}`: the checkpoint's is a {type(learner).__name__}, the configured one a "
            f"{type(target).__name__}"
        )
    _check_restorable(config, None, [learner])
    new = copy.deepcopy(learner)
    new.model_version = max(target.model_version, learner.model_version) + 1
    learners[learners.index(target)] = new
    return new


def _learners_of(source: Any, path: str | Path, config: Config, learner: str | None) -> dict[str, Any]:
    """learner name -> the whole learner to import from ``source`` (a checkpoint)."""
    if not isinstance(source, Checkpoint):
        raise StateError(f"{path}: --whole imports the learners of a checkpoint file, not a bare River model")
    names = [learner] if learner else [lr.name for lr in source.learners if lr.name in config.learners]
    found = {name: source.learner(name) for name in names}
    missing = [name for name, lr in found.items() if lr is None]
    if missing or not found:
        raise StateError(
            f"{path}: no learner {', '.join(f'`{m}`' for m in missing) or 'configured here'} in this checkpoint "
            f"(it has: {', '.join(lr.name for lr in source.learners)})"
        )
    return found


def _models_of(source: Any, path: str | Path, config: Config, learner: str | None) -> dict[str, Any]:
    """learner name -> River model to import from ``source`` (a checkpoint or an unpickled object)."""
    if isinstance(source, Checkpoint):
        names = [learner] if learner else [lr.name for lr in source.learners if lr.name in config.learners]
        models: dict[str, Any] = {}
        for name in names:
            found = source.learner(name)
            if found is None or getattr(found, "model", None) is None:
                raise StateError(f"{path}: no learner `{name}` with a model in this checkpoint")
            models[name] = found.model  # type: ignore[attr-defined]
        if not models:
            raise StateError(
                f"{path}: none of its learners ({', '.join(lr.name for lr in source.learners)}) "
                "is configured; name one with --learner"
            )
        return models
    if not isinstance(source, river_base.Base):
        raise StateError(f"{path}: a pickled {type(source).__name__}, not a River model")
    if learner is None and len(config.learners) != 1:
        raise StateError("a pickled model replaces one learner's model: name it with --learner")
    print(
        f"note: a plain pickle carries no version stamp nor signature; it must come from River {river.__version__}",
        file=sys.stderr,
    )
    return {learner or next(iter(config.learners)): source}


def import_model(
    config: Config,
    path: str | Path,
    *,
    learner: str | None = None,
    at_committed: bool = False,
    at_source: bool = False,
    whole: bool = False,
    trust_pickle: bool = False,
    access: GroupAccess = GroupAccess(),
) -> int:
    """Serve the model(s) of ``path`` (a checkpoint file, or with ``trust_pickle`` a pickled River
    model) from a new checkpoint; with ``whole``, a checkpoint's whole learners (model and state:
    the warm start from a backtest). With no checkpoint yet it starts from the beginning, with
    ``at_committed`` from the group's committed offsets, with ``at_source`` from the offsets of
    the imported checkpoint."""
    store = _store(config)
    if trust_pickle:
        print(
            f"warning: --trust-pickle: {path} is loaded without authentication; unpickling it runs any "
            "code it contains",
            file=sys.stderr,
        )
    source = read_any(path, store.keys, trust_pickle=trust_pickle)
    models = _learners_of(source, path, config, learner) if whole else _models_of(source, path, config, learner)
    base, committed = _base(config, store, access)
    if base is not None:
        offsets = dict(base.info.offsets)
    elif at_committed:
        if committed is None:
            raise StateError("--at-committed needs the broker (the group's committed offsets)")
        offsets = committed
    elif at_source:
        if not isinstance(source, Checkpoint):
            raise StateError("--at-source needs a checkpoint file (a bare model holds no offsets)")
        offsets = dict(source.info.offsets)
    else:
        offsets = {}
    origin = {
        "action": "import",
        "source": str(path),
        "learners": sorted(models),
        "base_version": base.info.seq if base is not None else None,
        "whole": whole,
    }
    return _apply(config, store, base, offsets, models, origin, force=access.force, whole=whole)


def rollback(config: Config, *, to: int, learner: str | None = None, access: GroupAccess = GroupAccess()) -> int:
    """Serve the model(s) of checkpoint version ``to`` again (``learner``: only this one) from a new
    checkpoint at the offsets of the current one."""
    store = _store(config)
    target = store.load(store.by_seq(to))
    names = [learner] if learner else [lr.name for lr in target.learners if lr.name in config.learners]
    models = {}
    for name in names:
        found = target.learner(name)
        if found is None or getattr(found, "model", None) is None:
            raise StateError(f"checkpoint v{to} has no learner `{name}` with a model")
        models[name] = found.model  # type: ignore[attr-defined]
    base, _ = _base(config, store, access)
    if base is None:
        print(f"stream: no current checkpoint in {store.describe()} to roll back", file=sys.stderr)
        return EXIT_MISSING
    origin = {"action": "rollback", "to_version": to, "learners": sorted(models), "base_version": base.info.seq}
    return _apply(config, store, base, dict(base.info.offsets), models, origin, force=access.force)


# --------------------------------------------------------------------------- sign


def sign(config: Config, *, version: int | None = None) -> int:
    """Sign checkpoint ``version`` (None: every checkpoint in the directory) with the current key
    (enabling a key on an existing deployment, or re-signing after a rotation). Checksums are
    verified; nothing is unpickled. The operator vouches that the files are genuine: that is what
    this command says."""
    store = _store(config)
    keys = store.keys
    if keys is None:
        raise StateError("no checkpoint key is configured (STREAM_CHECKPOINT_KEY or [checkpoints] key_file)")
    unkeyed = CheckpointStore(store.storage)
    names = [store.by_seq(version)] if version is not None else store.names()
    signed = 0
    for name in names:
        info = unkeyed.verify(name)  # magic, lengths, checksums; never unpickles
        if info.key_id == keys.signing_id:
            store.verify(name)
            print(f"v{info.seq} ({name}): already signed with key {info.key_id}")
            continue
        payload = store.storage.read(name, len(store.storage.read(name)) - info.payload_length)
        store.storage.write(name, encode(info, payload, keys))
        store.verify(name)
        signed += 1
        was = f"key {info.key_id}" if info.key_id else "unsigned"
        print(f"v{info.seq} ({name}): signed with key {keys.signing_id} (was {was})")
    print(f"signed {signed} checkpoint(s) in {store.describe()}")
    return 0
