"""``stream model list | export | import | rollback``: the checkpointed models, offline.

These commands work on the checkpoint directory of the configured group while
the service is stopped: a running instance keeps its model in memory and its
next checkpoints supersede anything written here. When the broker answers,
they refuse to touch a group with live members (``--force`` overrides), and
they pick the checkpoint the service would restore (the best one with offsets
<= the committed offsets); offline (``--offline`` or no broker) they use the
newest checkpoint that verifies.

Import and rollback never rewrite history: they write a *new* checkpoint with
the offsets of the one they start from, whose learners serve the imported (or
older) River model with a bumped ``model_version``. With ``[checkpoints]
validate = true`` the candidate is first scored against the current model on
the holdout of recent input records kept in the checkpoint; a candidate worse
by more than ``max_degradation`` is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from river import base as river_base

from stream.checkpoint_topic import checkpoint_storage
from stream.config import Config
from stream.state import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    IncompatibleCheckpoint,
    LocalStorage,
    Offsets,
    StateError,
    build,
    describe_offsets,
    encode,
    missing_state,
    read_any,
    swap_model,
)
from stream.validation import holdout_error

__all__ = ["add_model_commands"]

#: Exit codes: refused (validation, live group, incompatible), nothing to act on.
EXIT_REFUSED = 4
EXIT_MISSING = 5


def _store(config: Config) -> CheckpointStore:
    return CheckpointStore.for_config(config, instance_id="cli", storage=checkpoint_storage(config))


GroupState = tuple[dict[tuple[str, int], int | None], dict[tuple[str, int], int], int]


def _group_state(config: Config, timeout_s: float = 5.0) -> GroupState | None:
    """(committed, low watermarks, live members) of the configured group, or None when the broker does not answer."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient

    from stream.config import build_learners
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


def _base(args: argparse.Namespace, config: Config, store: CheckpointStore) -> tuple[Checkpoint | None, Offsets | None]:
    """The checkpoint the service would restore, and the committed offsets (None offline).
    Refuses a group with live members (unless --force)."""
    state = None if args.offline else _group_state(config)
    if state is None:
        if not args.offline:
            print("note: broker not reachable; using the newest valid checkpoint", file=sys.stderr)
        return store.latest(), None
    committed, low, members = state
    if members and not args.force:
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


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    state = None if args.offline else _group_state(config)
    restorable: str | None = None
    if state is not None:
        try:
            chosen = store.select(state[0], state[1]).checkpoint
            restorable = chosen.info.name if chosen is not None else None
        except IncompatibleCheckpoint:
            restorable = None
    rows = []
    for name, info, error in store.scan(verify=True):
        status = "ok" if error is None else f"INVALID: {error}"
        if info is not None and error is not None:
            status = f"REFUSED (not signed by the checkpoint key): {error}"
        elif info is not None and info.versions.get("river") != __import__("river").__version__:
            status = f"INCOMPATIBLE: river {info.versions.get('river')}"
        rows.append((name, info, status))
    if args.json:
        doc = [
            {"name": n, "status": st, "restorable": n == restorable, **(i.header() if i is not None else {})}
            for n, i, st in rows
        ]
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(f"checkpoints in {store.describe()}" + ("" if state is not None else " (offline: committed offsets unknown)"))
    if not rows:
        print("  (none)")
    for name, info, status in rows:
        if info is None:
            print(f"  ?      {name}  {status}")
            continue
        mark = "*" if name == restorable else " "
        origin = f" origin={info.origin.get('action')}" if info.origin else ""
        signed = f"key={info.key_id}" if info.key_id else "unsigned"
        print(f"{mark} v{info.seq:<5} {_fmt_time(info.created_at)}  {info.reason}{origin}  {signed}  {status}  "
              f"offsets: {describe_offsets(info.offsets)}")
        for s in info.learners:
            print(f"      {s['name']}: model_version={s['model_version']} n_learned={s['n_learned']} "
                  f"rolling: {_fmt_quality(s.get('quality', []))}")
    if state is not None:
        print("* = the checkpoint a start would restore (offsets <= committed)")
    return 0


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    ckpt = store.load(store.by_seq(args.version)) if args.version is not None else store.latest()
    if ckpt is None:
        print(f"stream: no valid checkpoint in {store.describe()}", file=sys.stderr)
        return EXIT_MISSING
    learners = ckpt.learners
    if args.learner:
        learner = ckpt.learner(args.learner)
        if learner is None:
            raise StateError(f"checkpoint v{ckpt.info.seq} has no learner `{args.learner}` "
                             f"(it has: {', '.join(lr.name for lr in learners)})")
        learners = [learner]
    out = Path(args.out)
    if args.format == "pickle":
        if len(learners) != 1:
            raise StateError("--format pickle exports one River model: name it with --learner")
        model = getattr(learners[0], "model", None)
        if model is None:
            raise StateError(f"learner `{learners[0].name}` has no `model` attribute to export")
        data = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        _, data = build(
            out.name, ckpt.info.seq, learners, ckpt.info.offsets, reason="export", holdout=ckpt.holdout,
            origin={"action": "export", "from_version": ckpt.info.seq, "group_id": ckpt.info.group_id},
            group_id=ckpt.info.group_id, keys=store.keys,
        )
    LocalStorage(out.parent if str(out.parent) else ".").write(out.name, data)
    print(f"exported v{ckpt.info.seq} ({', '.join(lr.name for lr in learners)}) to {out} ({len(data)} bytes)")
    return 0


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
        return False, (f"REFUSED: the candidate raised on {new.failed} of the holdout records "
                       f"(the current model on {cur.failed})")
    if cur.n == 0 or new.n == 0 or math.isnan(cur.mean) or math.isnan(new.mean):
        failed = f"; the current learner raised on {cur.failed} records" if cur.failed else ""
        return True, f"not validated: no scored holdout records for learner `{current.name}`{failed}"
    margin = config.checkpoints.max_degradation
    ok = new.mean <= cur.mean + margin * abs(cur.mean) + 1e-12
    verdict = "accepted" if ok else f"REFUSED (worse by more than {margin:.0%})"
    return ok, f"holdout of {cur.n} records, mean error: current {cur.mean:.6g}, candidate {new.mean:.6g}: {verdict}"


def _apply(
    args: argparse.Namespace,
    config: Config,
    store: CheckpointStore,
    base: Checkpoint | None,
    start_offsets: Offsets,
    models: dict[str, Any],
    origin: dict[str, Any],
) -> int:
    """Write a new checkpoint: ``base`` (or untrained learners) serving ``models``."""
    from stream.config import build_learners

    learners = copy.deepcopy(base.learners) if base is not None else build_learners(config)
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
    by_name = {lr.name: lr for lr in learners}
    refused = False
    for name, model in models.items():
        target = by_name.get(name)
        if target is None:
            raise StateError(f"no learner `{name}` is configured (learners: {', '.join(by_name)})")
        current = copy.deepcopy(target)
        swap_model(target, copy.deepcopy(model))
        if base is not None and config.checkpoints.validate:
            ok, message = _validate(config, base, current, target)
            print(f"{name}: {message}")
            refused = refused or not ok
        print(f"{name}: model_version {current.model_version} -> {target.model_version}")
    if refused and not args.force:
        print("stream: candidate refused by holdout validation (use --force to install it anyway)", file=sys.stderr)
        return EXIT_REFUSED
    holdout = base.holdout if base is not None else []
    info = store.write(learners, start_offsets, reason=origin["action"], holdout=holdout, origin=origin)
    print(f"wrote v{info.seq} ({info.name}) at offsets {describe_offsets(info.offsets) or '(beginning)'}; "
          "it serves from the next start")
    return 0


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    if args.trust_pickle:
        print(
            f"warning: --trust-pickle: {args.path} is loaded without authentication; unpickling it runs any "
            "code it contains",
            file=sys.stderr,
        )
    source = read_any(args.path, store.keys, trust_pickle=args.trust_pickle)
    if isinstance(source, Checkpoint):
        names = [args.learner] if args.learner else [lr.name for lr in source.learners if lr.name in config.learners]
        models: dict[str, Any] = {}
        for name in names:
            learner = source.learner(name)
            if learner is None or getattr(learner, "model", None) is None:
                raise StateError(f"{args.path}: no learner `{name}` with a model in this checkpoint")
            models[name] = learner.model  # type: ignore[attr-defined]
        if not models:
            raise StateError(f"{args.path}: none of its learners ({', '.join(lr.name for lr in source.learners)}) "
                             "is configured; name one with --learner")
    else:
        if not isinstance(source, river_base.Base):
            raise StateError(f"{args.path}: a pickled {type(source).__name__}, not a River model")
        if args.learner is None and len(config.learners) != 1:
            raise StateError("a pickled model replaces one learner's model: name it with --learner")
        models = {args.learner or next(iter(config.learners)): source}
        print("note: a plain pickle carries no version stamp nor signature; it must come from River "
              f"{__import__('river').__version__}", file=sys.stderr)
    base, committed = _base(args, config, store)
    if base is not None:
        offsets = dict(base.info.offsets)
    elif args.at_committed:
        if committed is None:
            raise StateError("--at-committed needs the broker (the group's committed offsets)")
        offsets = committed
    else:
        offsets = {}
    origin = {"action": "import", "source": str(args.path), "learners": sorted(models),
              "base_version": base.info.seq if base is not None else None}
    return _apply(args, config, store, base, offsets, models, origin)


def cmd_rollback(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    target = store.load(store.by_seq(args.to))
    names = [args.learner] if args.learner else [lr.name for lr in target.learners if lr.name in config.learners]
    models = {}
    for name in names:
        learner = target.learner(name)
        if learner is None or getattr(learner, "model", None) is None:
            raise StateError(f"checkpoint v{args.to} has no learner `{name}` with a model")
        models[name] = learner.model  # type: ignore[attr-defined]
    base, _ = _base(args, config, store)
    if base is None:
        print(f"stream: no current checkpoint in {store.describe()} to roll back", file=sys.stderr)
        return EXIT_MISSING
    origin = {"action": "rollback", "to_version": args.to, "learners": sorted(models), "base_version": base.info.seq}
    return _apply(args, config, store, base, dict(base.info.offsets), models, origin)


# --------------------------------------------------------------------------- sign


def cmd_sign(args: argparse.Namespace, config: Config) -> int:
    """Sign checkpoints already in the directory with the current key (enabling a key on an
    existing deployment, or re-signing after a rotation). Checksums are verified; nothing is
    unpickled. The operator vouches that the files are genuine: that is what this command says."""
    store = _store(config)
    if store.keys is None:
        raise StateError("no checkpoint key is configured (STREAM_CHECKPOINT_KEY or [checkpoints] key_file)")
    unkeyed = CheckpointStore(store.storage)
    names = [store.by_seq(args.version)] if args.version is not None else store.names()
    signed = 0
    for name in names:
        info = unkeyed.verify(name)  # magic, lengths, checksums; never unpickles
        if info.key_id == store.keys.signing_id:
            store.verify(name)
            print(f"v{info.seq} ({name}): already signed with key {info.key_id}")
            continue
        payload = store.storage.read(name, len(store.storage.read(name)) - info.payload_length)
        store.storage.write(name, encode(info, payload, store.keys))
        store.verify(name)
        signed += 1
        was = f"key {info.key_id}" if info.key_id else "unsigned"
        print(f"v{info.seq} ({name}): signed with key {store.keys.signing_id} (was {was})")
    print(f"signed {signed} checkpoint(s) in {store.describe()}")
    return 0


# --------------------------------------------------------------------------- wiring


def add_model_commands(
    sub: Any,
    add_kafka_args: Callable[[argparse.ArgumentParser], None],
    load_config: Callable[[argparse.Namespace], Config],
) -> None:
    """Register ``stream model ...`` on the CLI's subparsers."""

    def wrap(fn: Callable[[argparse.Namespace, Config], int]) -> Callable[[argparse.Namespace], int]:
        def handler(args: argparse.Namespace) -> int:
            try:
                return fn(args, load_config(args))
            except (StateError, CheckpointError, OSError) as exc:
                print(f"stream: {exc}", file=sys.stderr)
                return EXIT_REFUSED

        return handler

    model = sub.add_parser("model", help="list, export, import or roll back the checkpointed models")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, *, offline: bool = True) -> None:
        add_kafka_args(p)
        if offline:
            p.add_argument("--offline", action="store_true", help="do not contact the broker")

    force_help = "install even if holdout validation refuses it, or the group is live"
    p = actions.add_parser("list", help="checkpoints (versions) with time, offsets, model versions and rolling quality")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (the verified headers)")
    p.set_defaults(handler=wrap(cmd_list))

    p = actions.add_parser("export", help="write a checkpoint (or one learner's River model) to a file")
    common(p, offline=False)
    p.add_argument("--out", required=True, metavar="PATH")
    p.add_argument("--learner", metavar="NAME", help="only this learner")
    p.add_argument("--version", type=int, metavar="N", help="checkpoint version (default: the newest valid)")
    p.add_argument("--format", choices=("checkpoint", "pickle"), default="checkpoint",
                   help="a verified checkpoint file (default), or the bare pickled River model of --learner")
    p.set_defaults(handler=wrap(cmd_export))

    p = actions.add_parser("import", help="serve a model trained elsewhere (checkpoint file or pickled River model)")
    common(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--learner", metavar="NAME", help="the learner whose model is replaced")
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--at-committed", action="store_true",
                   help="with no checkpoint yet: serve from the committed offsets (default: learn from the beginning)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="the file is trusted: load a bare pickle (unpickling runs its code), or a checkpoint not "
        "signed by this deployment's key; without it both are refused",
    )
    p.set_defaults(handler=wrap(cmd_import))

    p = actions.add_parser("rollback", help="serve the model of an earlier checkpoint version again")
    common(p)
    p.add_argument("--to", type=int, required=True, metavar="VERSION", help="checkpoint version (see `model list`)")
    p.add_argument("--learner", metavar="NAME", help="only this learner (default: all)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(handler=wrap(cmd_rollback))

    p = actions.add_parser(
        "sign",
        help="sign checkpoints in the directory with the current checkpoint key (you vouch for them)",
        description="Sign the group's checkpoints with the first configured key: to enable a key on an existing "
        "deployment, or to re-sign after a rotation. Lengths and checksums are verified, nothing is unpickled. "
        "Only sign files you know the service wrote.",
    )
    common(p, offline=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every checkpoint of the group")
    which.add_argument("--version", type=int, metavar="N", help="only this checkpoint version")
    p.set_defaults(handler=wrap(cmd_sign))
