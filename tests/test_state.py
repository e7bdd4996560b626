"""Checkpoints without Kafka: determinism (T1), the file format, selection, pruning, the model CLI."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import river

from stream import faults
from stream.checkpoint import (
    MAGIC,
    CheckpointInfo,
    CheckpointKeys,
    StoredRecord,
    decode,
    decode_header,
    encode,
    load_keys,
)
from stream.config import Config, build_learners, parse_config
from stream.state import (
    CheckpointStore,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    LocalStorage,
    UnauthenticatedCheckpoint,
    swap_model,
)
from stream.validation import holdout_error

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, **checkpoints: Any) -> Config:
    return parse_config({
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g/1"},
        "checkpoints": {"dir": str(tmp_path / "ckpt"), **checkpoints},
        "learners": {
            "reg": {
                "kind": "custom", "input": "a", "output_topic": "out-a", "label": "y", "task": "regression",
                "features": ["x1", "x2"],
                "model": [{"class": "preprocessing.StandardScaler"},
                          {"class": "linear_model.LinearRegression", "params": {"l2": 0.001}}],
            },
            "clf": {
                "kind": "custom", "input": "b", "output_topic": "out-b", "label": "y", "task": "binary",
                "features": ["x1", "x2"],
                "model": [{"class": "preprocessing.StandardScaler"}, {"class": "linear_model.LogisticRegression"}],
            },
        },
    })


def events(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x1, x2 = rng.random(), rng.random()
        out.append({"event_id": f"e{i}", "x1": x1, "x2": x2, "y": 3 * x1 - 2 * x2 + rng.gauss(0, 0.1)})
    return out


def records(evs: list[dict[str, Any]], topic: str = "a") -> list[StoredRecord]:
    return [StoredRecord(topic, 0, i, 0, None, json.dumps(e).encode()) for i, e in enumerate(evs)]


def trained(cfg: Config, n: int = 300) -> list[Any]:
    reg, clf = build_learners(cfg)
    for e in events(n):
        for learner, ev in ((reg, e), (clf, {**e, "y": e["y"] > 0.5})):
            learner.predict(ev)
            learner.learn(ev)
    return [reg, clf]


# --------------------------------------------------------------------------- T1: determinism


def test_t1_pickled_learner_continues_identically(tmp_path: Path) -> None:
    """Persistence does not change behaviour: a learner pickled at event k and the
    original, fed the same events k+1..N, predict exactly the same numbers."""
    cfg = config(tmp_path)
    evs = events(2000, seed=3)
    reg, clf = build_learners(cfg)
    k = 700
    for e in evs[:k]:
        reg.predict(e)
        reg.learn(e)
        clf.predict({**e, "y": e["y"] > 0.5})
        clf.learn({**e, "y": e["y"] > 0.5})
    reg2, clf2 = pickle.loads(pickle.dumps([reg, clf]))
    for e in evs[k:]:
        b = {**e, "y": e["y"] > 0.5}
        assert reg.predict(e) == reg2.predict(e)
        assert clf.predict(b) == clf2.predict(b)
        reg.learn(e)
        reg2.learn(e)
        clf.learn(b)
        clf2.learn(b)
    assert reg.n_learned == reg2.n_learned == len(evs)
    assert list(reg.quality()) == list(reg2.quality())


def test_t1_checkpoint_roundtrip_through_the_store(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    learners = trained(cfg)
    store = CheckpointStore.for_config(cfg)
    info = store.write(learners, {("a", 0): 300, ("b", 0): 300}, reason="test", holdout=records(events(5)))
    assert store.names() == [info.name]
    assert Path(store.describe()) == tmp_path / "ckpt" / "g_1"  # the group id, made path-safe
    ck = store.load(info.name)
    assert ck.info.offsets == {("a", 0): 300, ("b", 0): 300}
    assert ck.info.versions["river"] == river.__version__ and ck.info.versions["format"] == "2"
    assert [s["n_learned"] for s in ck.info.learners] == [300, 300]
    assert [r.value() for r in ck.holdout] == [r.value() for r in records(events(5))]
    probe = {"x1": 0.3, "x2": 0.6, "y": 0.0}
    assert [lr.predict(probe) for lr in ck.learners] == [lr.predict(probe) for lr in learners]


# --------------------------------------------------------------------------- golden fixture and versions


def test_golden_checkpoint_from_the_pinned_river_loads() -> None:
    """Made by tests/fixtures/make_golden_checkpoint.py with the pinned River: a
    River upgrade that breaks its pickles fails here before it breaks a deployment."""
    path = FIXTURES / f"golden-river-{river.__version__}.ckpt"
    assert path.exists(), f"no golden checkpoint for river {river.__version__}: River changed? regenerate on purpose"
    expected = json.loads(path.with_suffix(".json").read_text())
    ck = decode(path.name, path.read_bytes())
    assert ck.info.versions["river"] == expected["river"] == river.__version__
    reg, clf = ck.learners
    assert (reg.n_learned, clf.n_learned) == (200, 200)
    probes = [{"x1": x1 / 4, "x2": x2 / 4} for x1 in range(5) for x2 in range(5)]
    assert [reg.model.predict_one(x) for x in probes] == expected["reg"]
    assert [clf.model.predict_proba_one(x).get(True, 0.0) for x in probes] == expected["clf"]


def _restamp(data: bytes, **changes: Any) -> bytes:
    """The same checkpoint with header fields changed and the header checksum recomputed."""
    import hashlib
    import struct

    prefix = struct.Struct(">8sI32s")
    _, n, _ = prefix.unpack_from(data)
    header = json.loads(data[prefix.size : prefix.size + n])
    for key, value in changes.items():
        if key == "river":
            header["versions"]["river"] = value
        else:
            header[key] = value
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return prefix.pack(MAGIC, len(raw), hashlib.sha256(raw).digest()) + raw + data[prefix.size + n :]


def test_checkpoint_from_another_river_version_is_refused(tmp_path: Path) -> None:
    golden = (FIXTURES / f"golden-river-{river.__version__}.ckpt").read_bytes()
    other = _restamp(golden, river="0.21.0")
    with pytest.raises(IncompatibleCheckpoint, match=r"written with river 0\.21\.0.*runs river " + river.__version__):
        decode("old.ckpt", other)
    # Selection refuses too (it does not silently fall back to an older checkpoint).
    store = CheckpointStore(LocalStorage(tmp_path))
    store.storage.write("ckpt-000000000001-00000000.ckpt", golden)
    store.storage.write("ckpt-000000000002-00000000.ckpt", other)
    committed = {("golden-a", 0): 200, ("golden-b", 0): 200}
    with pytest.raises(IncompatibleCheckpoint, match=r"0\.21\.0"):
        store.select(committed, {k: 0 for k in committed})
    # A newer checkpoint format is refused as well.
    with pytest.raises(IncompatibleCheckpoint, match="format 3"):
        decode("future.ckpt", _restamp(golden, format_version=3))


# --------------------------------------------------------------------------- integrity


def test_torn_truncated_or_altered_checkpoints_are_detected(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = CheckpointStore.for_config(cfg)
    good = store.write(trained(cfg, 50), {("a", 0): 50}, reason="t")
    data = store.storage.read(good.name)
    for cut in (0, 10, 50, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptCheckpoint):
            decode("x", data[:cut])
    flipped = bytearray(data)
    flipped[-20] ^= 0x01
    with pytest.raises(CorruptCheckpoint, match="payload checksum"):
        decode("x", bytes(flipped))
    header_flip = bytearray(data)
    header_flip[60] ^= 0x01
    with pytest.raises(CorruptCheckpoint, match="header checksum"):
        decode("x", bytes(header_flip))
    with pytest.raises(CorruptCheckpoint, match="magic"):
        decode("x", b"\x80\x05" + data[2:])


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = CheckpointStore.for_config(cfg)
    learners = trained(cfg, 100)
    older = store.write(learners, {("a", 0): 100, ("b", 0): 100}, reason="t")
    newer = store.write(learners, {("a", 0): 100, ("b", 0): 100}, reason="t")
    path = Path(store.describe()) / newer.name
    path.write_bytes(path.read_bytes()[:-100])
    sel = store.select({("a", 0): 100, ("b", 0): 100}, {("a", 0): 0, ("b", 0): 0})
    assert sel.checkpoint is not None and sel.checkpoint.info.name == older.name
    assert sel.skipped and sel.skipped[0][0] == newer.name and "payload" in sel.skipped[0][1]


def test_crash_mid_write_leaves_no_checkpoint_only_a_temporary(tmp_path: Path) -> None:
    """A real kill -9 inside the write (STREAM_FAULT_AT=mid_checkpoint_write): the
    final name never appears, the half-written temporary is ignored and cleaned."""
    code = (
        "from stream.state import LocalStorage\n"
        f"LocalStorage({str(tmp_path)!r}).write('ckpt-000000000001-00000000.ckpt', b'x' * 100000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"STREAM_FAULT_AT": "mid_checkpoint_write",
                          "PATH": "/usr/bin:/bin"}, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert b"fault injected" in proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]
    storage = LocalStorage(tmp_path)
    assert storage.names() == [] and CheckpointStore(storage).names() == []
    assert storage.remove_temporaries() == 1 and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- selection and pruning


def test_selection_takes_the_closest_checkpoint_not_ahead_of_the_committed_offsets(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = CheckpointStore.for_config(cfg)
    learners = trained(cfg, 10)
    c1 = store.write(learners, {("a", 0): 10, ("a", 1): 5}, reason="t")
    c2 = store.write(learners, {("a", 0): 20, ("a", 1): 5}, reason="t")
    c3 = store.write(learners, {("a", 0): 30, ("a", 1): 9}, reason="t")  # written, then the commit was lost
    low = {("a", 0): 0, ("a", 1): 0}
    sel = store.select({("a", 0): 25, ("a", 1): 9}, low)
    assert sel.checkpoint is not None and sel.checkpoint.info.name == c2.name
    assert [n for n, _ in sel.skipped] == [c3.name]
    assert store.select({("a", 0): 30, ("a", 1): 9}, low).checkpoint.info.name == c3.name  # type: ignore[union-attr]
    # Nothing committed for a partition: only checkpoints at its start qualify.
    assert store.select({("a", 0): 30, ("a", 1): None}, low).checkpoint is None
    # A partition the checkpoint does not know starts at its low watermark.
    sel = store.select({("a", 0): 30, ("a", 1): 9, ("a", 2): 4}, {**low, ("a", 2): 0})
    assert sel.checkpoint is not None and sel.checkpoint.info.name == c3.name
    # Same offsets: the newest wins (an import or rollback written after it).
    c4 = store.write(learners, {("a", 0): 20, ("a", 1): 5}, reason="import")
    assert store.select({("a", 0): 25, ("a", 1): 9}, low).checkpoint.info.name == c4.name  # type: ignore[union-attr]
    assert c1.seq < c2.seq < c3.seq < c4.seq


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = CheckpointStore.for_config(cfg)
    learners = trained(cfg, 5)
    infos = [store.write(learners, {("a", 0): i}, reason="t") for i in range(6)]
    deleted = store.prune(3, protect=[infos[1].name])
    assert sorted(deleted) == sorted(i.name for i in (infos[0], infos[2]))
    assert store.names() == [i.name for i in (infos[5], infos[4], infos[3], infos[1])]
    # Sequence numbers continue after pruning and across store instances (another writer).
    again = CheckpointStore.for_config(cfg).write(learners, {("a", 0): 9}, reason="t")
    assert again.seq == infos[-1].seq + 1


# --------------------------------------------------------------------------- model swap and validation


def test_swap_model_bumps_the_version_and_holdout_scores_learners(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    reg, _ = trained(cfg, 500)
    holdout = records(events(300, seed=9))
    good = holdout_error(reg, holdout, cfg)
    assert good is not None and good.n == 300 and good.mean < 0.5 and good.failed == 0
    candidate = copy.deepcopy(reg)
    fresh = build_learners(cfg)[0].model
    swap_model(candidate, fresh)
    assert candidate.model is fresh and candidate.model_version == reg.model_version + 1
    bad = holdout_error(candidate, holdout, cfg)
    assert bad is not None and bad.mean > good.mean * 1.5
    nothing = holdout_error(reg, records(events(3), topic="elsewhere"), cfg)
    assert nothing is not None and nothing.n == 0


def test_fault_spec_parsing() -> None:
    assert faults.parse("mid_batch:300, after_commit") == {"mid_batch": 300, "after_commit": 1}
    assert faults.parse(None) == {} and faults.parse("") == {}
    with pytest.raises(ValueError, match="unknown point"):
        faults.parse("nowhere")
    assert not faults.ARMED  # the test process runs with the hook unset: zero cost


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> int:
    from stream.cli import main

    return main(list(args))


@pytest.fixture()
def deployed(tmp_path: Path) -> tuple[Path, Config, CheckpointStore]:
    """A config file and two checkpoints as a service would leave them (v1 untrained, v2 trained)."""
    cfg_path = tmp_path / "stream.toml"
    cfg = config(tmp_path)
    cfg_path.write_text(f"""
[kafka]
bootstrap_servers = "127.0.0.1:1"
group_id = "g/1"
[checkpoints]
dir = "{tmp_path / 'ckpt'}"
max_degradation = 0.05
[learners.reg]
kind = "custom"
input = "a"
output_topic = "out-a"
label = "y"
task = "regression"
features = ["x1", "x2"]
model = [
  {{ class = "preprocessing.StandardScaler" }},
  {{ class = "linear_model.LinearRegression", params = {{ l2 = 0.001 }} }},
]
[learners.clf]
kind = "custom"
input = "b"
output_topic = "out-b"
label = "y"
task = "binary"
features = ["x1", "x2"]
model = [{{ class = "preprocessing.StandardScaler" }}, {{ class = "linear_model.LogisticRegression" }}]
""")
    store = CheckpointStore.for_config(cfg)
    store.write(build_learners(cfg), {("a", 0): 0, ("b", 0): 0}, reason="initial")
    hold = records(events(200, seed=11)) + records([{**e, "y": e["y"] > 0.5} for e in events(200, seed=12)], "b")
    store.write(trained(cfg, 600), {("a", 0): 600, ("b", 0): 600}, reason="periodic", holdout=hold)
    return cfg_path, cfg, store


def test_cli_model_list_and_export(deployed: tuple[Path, Config, CheckpointStore], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path, _, _ = deployed
    assert _cli("model", "list", "--config", str(cfg_path), "--offline") == 0
    out = capsys.readouterr().out
    assert "v2" in out and "v1" in out and "n_learned=600" in out and "rolling: mae=" in out
    assert _cli("model", "list", "--config", str(cfg_path), "--offline", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["seq"] for d in doc] == [2, 1] and doc[0]["offsets"] == {"a": {"0": 600}, "b": {"0": 600}}

    out_path = tmp_path / "export.ckpt"
    assert _cli("model", "export", "--config", str(cfg_path), "--out", str(out_path), "--learner", "reg") == 0
    exported = decode(out_path.name, out_path.read_bytes())
    assert [lr.name for lr in exported.learners] == ["reg"] and exported.learners[0].n_learned == 600
    pkl = tmp_path / "reg.pkl"
    assert _cli("model", "export", "--config", str(cfg_path), "--out", str(pkl), "--learner", "reg",
                "--format", "pickle", "--version", "1") == 0
    assert type(pickle.loads(pkl.read_bytes())).__name__ == "Pipeline"


def test_cli_import_validates_on_the_holdout(deployed: tuple[Path, Config, CheckpointStore], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path, cfg, store = deployed
    # A worse model (untrained) is refused ...
    untrained = tmp_path / "untrained.pkl"
    untrained.write_bytes(pickle.dumps(build_learners(cfg)[0].model))
    assert _cli("model", "import", "--config", str(cfg_path), str(untrained), "--learner", "reg", "--offline",
                "--trust-pickle") == 4
    assert "REFUSED" in capsys.readouterr().out and len(store.names()) == 2
    # ... unless forced; the import is a new checkpoint at the current offsets, model_version bumped.
    assert _cli("model", "import", "--config", str(cfg_path), str(untrained), "--learner", "reg",
                "--offline", "--force", "--trust-pickle") == 0
    ck = store.latest()
    assert ck is not None and ck.info.seq == 3 and ck.info.offsets == {("a", 0): 600, ("b", 0): 600}
    assert ck.info.origin is not None and ck.info.origin["action"] == "import"
    reg = ck.learner("reg")
    assert reg is not None and reg.model_version == 2 and reg.n_learned == 600
    # A model as good as the current one passes (a checkpoint file trained elsewhere).
    better = tmp_path / "better.ckpt"
    better.write_bytes(store.storage.read(store.by_seq(2)))
    assert _cli("model", "import", "--config", str(cfg_path), str(better), "--offline") == 0
    assert "accepted" in capsys.readouterr().out
    ck = store.latest()
    assert ck is not None and ck.info.seq == 4 and ck.learner("reg").model_version == 3  # type: ignore[union-attr]


def test_cli_rollback(deployed: tuple[Path, Config, CheckpointStore], capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path, cfg, store = deployed
    # v1 is the untrained model: worse on the holdout, refused without --force.
    assert _cli("model", "rollback", "--config", str(cfg_path), "--to", "1", "--offline") == 4
    assert _cli("model", "rollback", "--config", str(cfg_path), "--to", "1", "--learner", "clf",
                "--offline", "--force") == 0
    ck = store.latest()
    assert ck is not None and ck.info.origin == {"action": "rollback", "to_version": 1, "learners": ["clf"],
                                                  "base_version": 2}
    clf, reg = ck.learner("clf"), ck.learner("reg")
    assert clf is not None and reg is not None
    assert clf.model_version == 2 and reg.model_version == 1  # only the named learner
    fresh = build_learners(cfg)[1]
    probe = {"x1": 0.2, "x2": 0.9}
    assert clf.model.predict_proba_one(probe) == fresh.model.predict_proba_one(probe)
    assert _cli("model", "rollback", "--config", str(cfg_path), "--to", "99", "--offline") == 4
    assert "no checkpoint with version 99" in capsys.readouterr().err


def test_encode_is_stable(tmp_path: Path) -> None:
    """The header is canonical JSON: decoding and re-encoding gives the same bytes."""
    cfg = config(tmp_path)
    store = CheckpointStore.for_config(cfg)
    info = store.write(trained(cfg, 5), {("a", 0): 5}, reason="t")
    data = store.storage.read(info.name)
    ck = decode(info.name, data)
    payload = data[len(data) - ck.info.payload_length :]
    assert encode(ck.info, payload) == data


def test_a_learner_whose_class_gained_state_is_refused(tmp_path: Path,
                                                       deployed: tuple[Path, Config, CheckpointStore],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint from before a learner class gained an attribute would fail at the
    first use of it: the start and the model commands refuse it with the reason."""
    from stream.state import StateError, missing_state
    from stream.task_state import adopt

    cfg_path, cfg, store = deployed
    old = trained(cfg, 10)
    for learner in old:
        del learner.__dict__["evaluation"]  # as if pickled by a version without it
    assert missing_state(old[0], build_learners(cfg)[0]) == ["evaluation"]
    templates = build_learners(cfg)
    with pytest.raises(StateError, match=r"learner `reg` in the checkpoint lacks state.*evaluation.*__setstate__"):
        adopt(old, templates)
    assert [lr.name for lr in adopt(trained(cfg, 10), templates)] == ["reg", "clf"]

    store.write(old, {("a", 0): 700, ("b", 0): 700}, reason="periodic")
    fresh = tmp_path / "fresh.pkl"
    fresh.write_bytes(pickle.dumps(build_learners(cfg)[0].model))
    assert _cli("model", "import", "--config", str(cfg_path), str(fresh), "--learner", "reg", "--offline",
                "--trust-pickle") == 4
    assert "lacks state" in capsys.readouterr().err


# --------------------------------------------------------------------------- authentication (format 2)

KEY = "0123456789abcdef" * 4  # 64 bytes: what `openssl rand -hex 32` gives
OTHER_KEY = "fedcba9876543210" * 4


class _Planted:
    """Unpickling it creates ``marker``: stands for any code a forged pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _keys(*keys: str) -> CheckpointKeys:
    return CheckpointKeys([k.encode() for k in keys], "test")


def _forge(like: CheckpointInfo, marker: Path, seq: int, keys: CheckpointKeys | None = None, **changes: Any) -> bytes:
    """A checkpoint file with ``like``'s header (offsets, versions) whose pickle creates ``marker``."""
    payload = pickle.dumps({"learners": [_Planted(marker)], "holdout": []})
    info = dataclasses.replace(
        like, name=f"ckpt-{seq:012d}-0badf00d.ckpt", seq=seq, payload_length=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(), **changes,
    )  # fmt: skip
    return encode(info, payload, keys)


def test_signed_checkpoint_roundtrip_the_key_is_nowhere_in_the_file(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    keys = _keys(KEY)
    store = CheckpointStore.for_config(cfg, keys=keys)
    info = store.write(trained(cfg, 20), {("a", 0): 20}, reason="t")
    data = store.storage.read(info.name)
    assert KEY.encode() not in data and KEY not in repr(keys) and KEY not in str(keys)
    assert info.key_id == keys.signing_id and len(info.key_id) == 16
    header = json.loads(data[44 : 44 + struct.unpack(">I", data[8:12])[0]])
    assert header["format_version"] == 2 and header["mac"] == {"alg": "hmac-sha256", "key_id": keys.signing_id}
    ck = store.load(info.name)
    assert ck.info.key_id == keys.signing_id and [lr.n_learned for lr in ck.learners] == [20, 20]
    # The MAC is HMAC-SHA256(key, domain + header bytes), sitting right after the header.
    n = struct.unpack(">I", data[8:12])[0]
    expected = hmac.new(KEY.encode(), b"stream-checkpoint-v2\0" + data[44 : 44 + n], hashlib.sha256).digest()
    assert data[44 + n : 44 + n + 32] == expected
    # Without a key it is still read (nothing to verify it with); listing shows who signed it.
    assert CheckpointStore.for_config(cfg, keys=None).load(info.name).info.key_id == keys.signing_id


def test_unsigned_forged_or_altered_checkpoints_are_refused_before_unpickling(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    keys = _keys(KEY)
    genuine = CheckpointStore.for_config(cfg, keys=keys).write(trained(cfg, 20), {("a", 0): 20}, reason="t")
    data = (tmp_path / "ckpt" / "g_1" / genuine.name).read_bytes()
    marker = tmp_path / "pwned"
    cases = {
        "unsigned": (_forge(genuine, marker, 7), "unsigned checkpoint"),
        "another key": (_forge(genuine, marker, 7, _keys(OTHER_KEY)), "not one of this process's keys"),
        "format 1": (_v1(_forge(genuine, marker, 7)), "format 1"),
        # An unknown format is not trusted to say how it is laid out: refused, not a fatal "incompatible".
        "format 3": (_restamp(_forge(genuine, marker, 7), format_version=3), "format 3"),
        # The genuine header, altered (offsets moved ahead) with its checksum recomputed: the MAC breaks.
        "altered header": (_restamp(data, offsets={"a": {"0": 10**9}}), "MAC does not match"),
        # A mac field claiming our key id over a forged header.
        "claims our key": (_restamp(_forge(genuine, marker, 7), mac={"alg": "hmac-sha256",
                                                                     "key_id": keys.signing_id}),
                           "MAC does not match"),
    }  # fmt: skip
    for what, (forged, reason) in cases.items():
        with pytest.raises(UnauthenticatedCheckpoint, match=re.escape(reason)) as err:
            decode("planted.ckpt", forged, keys)
        assert "planted.ckpt" in str(err.value) and KEY not in str(err.value), what
        assert not marker.exists(), what
    # The genuine signed header over a swapped payload: the header binds the payload's sha256.
    n = struct.unpack(">I", data[8:12])[0]
    evil = pickle.dumps({"learners": [_Planted(marker)], "holdout": []})
    swapped = data[: 44 + n + 32] + evil.ljust(genuine.payload_length, b".")[: genuine.payload_length]
    with pytest.raises(CorruptCheckpoint, match="payload checksum"):
        decode("swapped.ckpt", swapped, keys)
    assert not marker.exists()
    # Anti-vacuity: without a key the forged pickle does run.
    decode("planted.ckpt", cases["unsigned"][0])
    assert marker.exists()


def _v1(data: bytes) -> bytes:
    """A format-2 file rewritten in format 1 (no MAC slot)."""
    n = struct.unpack(">I", data[8:12])[0]
    v1 = _restamp(data, format_version=1)
    m = struct.unpack(">I", v1[8:12])[0]
    return v1[: 44 + m] + data[44 + n + 32 :]


def test_format_1_is_still_read_without_a_key(tmp_path: Path) -> None:
    golden = FIXTURES / f"golden-river-{river.__version__}.ckpt"
    info, start = decode_header(golden.name, golden.read_bytes())
    assert info.format_version == 1 and info.key_id == "" and start == len(golden.read_bytes()) - info.payload_length
    store = CheckpointStore(LocalStorage(tmp_path), keys=_keys(KEY))
    store.storage.write("ckpt-000000000001-00000000.ckpt", golden.read_bytes())
    [(_, listed, error)] = list(store.scan())
    assert listed is not None and listed.seq == info.seq and error is not None and "format 1" in error


def test_rotation_previous_keys_verify_the_current_key_signs(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    old = CheckpointStore.for_config(cfg, keys=_keys(OTHER_KEY)).write(trained(cfg, 5), {("a", 0): 5}, reason="t")
    rotated = CheckpointStore.for_config(cfg, keys=_keys(KEY, OTHER_KEY))
    assert rotated.load(old.name).info.key_id == _keys(OTHER_KEY).signing_id
    new = rotated.write(trained(cfg, 6), {("a", 0): 6}, reason="t")
    assert new.key_id == _keys(KEY).signing_id != old.key_id
    with pytest.raises(UnauthenticatedCheckpoint):  # the previous key retired: its checkpoints are refused
        CheckpointStore.for_config(cfg, keys=_keys(KEY)).load(old.name)


def test_selection_passes_over_planted_checkpoints_with_higher_sequence_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path)
    store = CheckpointStore.for_config(cfg, keys=_keys(KEY))
    genuine = store.write(trained(cfg, 30), {("a", 0): 30, ("b", 0): 30}, reason="t")
    marker = tmp_path / "pwned"
    planted = {
        8: _forge(genuine, marker, 8),
        9: _forge(genuine, marker, 9, _keys(OTHER_KEY)),
        10: _forge(genuine, marker, 10, versions={**genuine.versions, "river": "0.21.0"}),  # would be fatal if trusted
    }
    for seq, data in planted.items():
        store.storage.write(f"ckpt-{seq:012d}-0badf00d.ckpt", data)
    committed = {("a", 0): 30, ("b", 0): 30}
    sel = store.select(committed, dict.fromkeys(committed, 0))
    assert sel.checkpoint is not None and sel.checkpoint.info.name == genuine.name
    assert sel.refused == {f"ckpt-{s:012d}-0badf00d.ckpt" for s in planted}
    assert not marker.exists()
    caplog.set_level("ERROR")
    ck = store.latest()
    assert ck is not None and ck.info.name == genuine.name and not marker.exists()
    assert sum("not signed by the checkpoint key" in r.getMessage() for r in caplog.records) == 3
    # Anti-vacuity: without a key, the planted files stop the start or run.
    unkeyed = CheckpointStore.for_config(cfg, keys=None)
    with pytest.raises(IncompatibleCheckpoint, match=r"0\.21\.0"):
        unkeyed.select(committed, dict.fromkeys(committed, 0))
    unkeyed.delete("ckpt-000000000010-0badf00d.ckpt")
    assert unkeyed.select(committed, dict.fromkeys(committed, 0)).checkpoint is not None
    assert marker.exists()


def test_the_forked_background_writer_signs(tmp_path: Path) -> None:
    from stream.task_state import _checkpoint_child

    cfg = config(tmp_path)
    keys = _keys(KEY)
    store = CheckpointStore.for_config(cfg, keys=keys)
    learners = trained(cfg, 10)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        os.close(r)
        _checkpoint_child(store, learners, {("a", 0): 10}, [], w)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as report:
        doc = json.loads(report.read())
    assert status == 0, doc
    assert store.load(doc["name"]).info.key_id == keys.signing_id


def test_load_keys_from_the_environment_or_a_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from stream.config import ConfigError

    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n{OTHER_KEY}\n")
    key_file.chmod(0o600)
    cfg = config(tmp_path, key_file=str(key_file))
    keys = load_keys(cfg, environ={})
    assert keys is not None and keys.ids == [_keys(KEY).signing_id, _keys(OTHER_KEY).signing_id]
    env_keys = load_keys(cfg, environ={"STREAM_CHECKPOINT_KEY": OTHER_KEY})  # the environment wins
    assert env_keys is not None and env_keys.ids == [_keys(OTHER_KEY).signing_id]
    short = tmp_path / "short"
    short.write_text("s3cr3t-but-short\n")
    bad = {
        str(tmp_path / "missing"): "no such file",
        str(short): "is 16 bytes, at least 32",
        str(tmp_path): "cannot be read",
    }
    for path, message in bad.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_keys(config(tmp_path, key_file=path), environ={})
        assert "s3cr3t" not in str(err.value)
    with pytest.raises(ConfigError, match="at least 32"):
        load_keys(cfg, environ={"STREAM_CHECKPOINT_KEY": "s3cr3t"})
    # No key: one warning per process, however many stores are made.
    monkeypatch.setattr("stream.checkpoint._warned_unauthenticated", False)
    caplog.set_level("WARNING")
    assert load_keys(config(tmp_path), environ={}) is None and load_keys(config(tmp_path), environ={}) is None
    assert sum("checkpoints are unauthenticated" in r.getMessage() for r in caplog.records) == 1
    assert KEY not in caplog.text and OTHER_KEY not in caplog.text


@pytest.fixture()
def signed(deployed: tuple[Path, Config, CheckpointStore], tmp_path: Path) -> tuple[Path, CheckpointStore, Path]:
    """The deployment of ``deployed`` with a key file configured and its checkpoints signed."""
    cfg_path, _, old = deployed
    key_file = tmp_path / "checkpoint.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    cfg_path.write_text(cfg_path.read_text().replace("[checkpoints]\n", f'[checkpoints]\nkey_file = "{key_file}"\n'))
    store = CheckpointStore(old.storage, group_id=old.group_id, keys=_keys(KEY))
    for name in old.names():
        ck = old.load(name)
        store.storage.write(name, encode(ck.info, old.storage.read(name)[-ck.info.payload_length :], store.keys))
    return cfg_path, store, tmp_path / "pwned"


def test_cli_import_and_rollback_refuse_unsigned_files_and_bare_pickles(
    signed: tuple[Path, CheckpointStore, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path, store, marker = signed
    genuine = store.info(store.names()[0])
    before = store.names()
    crafted = tmp_path / "crafted.ckpt"
    crafted.write_bytes(_forge(genuine, marker, 3))
    wrong = tmp_path / "wrong-key.ckpt"
    wrong.write_bytes(_forge(genuine, marker, 3, _keys(OTHER_KEY)))
    bare = tmp_path / "model.pkl"
    bare.write_bytes(pickle.dumps(_Planted(marker)))
    for path, reason in ((crafted, "unsigned"), (wrong, "bad signature"), (bare, "--trust-pickle")):
        assert _cli("model", "import", "--config", str(cfg_path), str(path), "--learner", "reg", "--offline") == 4
        err = capsys.readouterr().err
        assert str(path) in err and "refused" in err and reason in err, err
        assert not marker.exists() and store.names() == before
    # A bare pickle is refused without a key too.
    unkeyed = tmp_path / "unkeyed.toml"
    unkeyed.write_text("\n".join(ln for ln in cfg_path.read_text().splitlines() if not ln.startswith("key_file")))
    assert _cli("model", "import", "--config", str(unkeyed), str(bare), "--learner", "reg", "--offline") == 4
    assert "--trust-pickle" in capsys.readouterr().err and not marker.exists()
    # Rollback to a planted version: refused by name, nothing run.
    store.storage.write("ckpt-000000000009-0badf00d.ckpt", _forge(genuine, marker, 9))
    assert _cli("model", "rollback", "--config", str(cfg_path), "--to", "9", "--offline", "--force") == 4
    err = capsys.readouterr().err
    assert "ckpt-000000000009-0badf00d.ckpt" in err and "refused" in err and not marker.exists()
    # model list shows it refused, and who signed the others; never the key.
    assert _cli("model", "list", "--config", str(cfg_path), "--offline") == 0
    out = capsys.readouterr().out
    assert "v9" in out and "REFUSED" in out and f"key={store.keys.signing_id}" in out  # type: ignore[union-attr]
    assert KEY not in out and not marker.exists()
    # A correctly signed checkpoint still imports (an export of this deployment, signed by it).
    exported = tmp_path / "export.ckpt"
    assert _cli("model", "export", "--config", str(cfg_path), "--out", str(exported), "--version", "2") == 0
    assert decode(exported.name, exported.read_bytes(), store.keys).info.key_id == store.keys.signing_id  # type: ignore[union-attr]
    assert _cli("model", "import", "--config", str(cfg_path), str(exported), "--offline", "--force") == 0
    assert store.load(store.names()[0]).info.origin["action"] == "import"  # type: ignore[index]
    assert store.info(store.names()[0]).key_id == store.keys.signing_id  # type: ignore[union-attr]
    # The rollback writer signs too.
    store.delete("ckpt-000000000009-0badf00d.ckpt")
    assert _cli("model", "rollback", "--config", str(cfg_path), "--to", "1", "--offline", "--force") == 0
    assert store.load(store.names()[0]).info.origin["action"] == "rollback"  # type: ignore[index]
    assert KEY not in capsys.readouterr().err


def test_cli_sign_enables_a_key_on_an_existing_deployment(
    deployed: tuple[Path, Config, CheckpointStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path, _, old = deployed
    assert _cli("model", "sign", "--config", str(cfg_path), "--all") == 4  # no key configured
    assert "no checkpoint key" in capsys.readouterr().err
    key_file = tmp_path / "checkpoint.key"
    key_file.write_text(f"{KEY}\n")
    cfg_path.write_text(cfg_path.read_text().replace("[checkpoints]\n", f'[checkpoints]\nkey_file = "{key_file}"\n'))
    keyed = CheckpointStore(old.storage, keys=_keys(KEY))
    assert keyed.latest() is None  # the unsigned checkpoints are refused once the key is on
    marker = tmp_path / "pwned"
    keyed.storage.write("ckpt-000000000000-0badf00d.ckpt", b"STRMCKPT" + b"\0" * 10)  # corrupt: never signed
    assert _cli("model", "sign", "--config", str(cfg_path), "--version", "2") == 0
    assert keyed.info(keyed.by_seq(2)).key_id == keyed.keys.signing_id  # type: ignore[union-attr]
    assert _cli("model", "sign", "--config", str(cfg_path), "--all") == 4  # stops at the corrupt file
    keyed.delete("ckpt-000000000000-0badf00d.ckpt")
    assert _cli("model", "sign", "--config", str(cfg_path), "--all") == 0
    out = capsys.readouterr().out
    assert "v2" in out and "already signed" in out and "(was unsigned)" in out and KEY not in out
    assert all(keyed.verify(n).key_id == keyed.keys.signing_id for n in keyed.names())  # type: ignore[union-attr]
    ck = keyed.latest()
    assert ck is not None and ck.info.seq == 2 and not marker.exists()
    assert _cli("model", "rollback", "--config", str(cfg_path), "--to", "1", "--offline", "--force") == 0


def test_holdout_scores_a_learner_that_holds_outcomes_for_drift_detection() -> None:
    """The risk learner feeds its drift detector in prediction order (outcomes held back until their
    label window closes); scoring a holdout must still see every outcome, not a detector's view."""
    from stream.checkpoint import StoredRecord as Stored
    from stream.config import load_config
    from stream.simulate import SimConfig, Simulation

    cfg = load_config(None)
    risk = next(lr for lr in build_learners(cfg) if lr.name == "risk")
    topics = cfg.input_topics()
    sim = Simulation(SimConfig(seed=3, events=6000, fraud_rate=0.2, label_delay_median_s=60.0))
    records = [Stored(topics[s], 0, n, ts, k, v) for n, (s, k, v, ts) in enumerate(sim)]
    score = holdout_error(risk, records, cfg)
    assert score is not None and score.failed == 0
    assert score.n > 0, score


# --------------------------------------------------------------------------- per-task stores (scale-out)


def test_task_stores_are_scoped_and_one_task_reads_the_checkpoints_from_before_scale_out(tmp_path: Path) -> None:
    """Each task keeps its own checkpoints (``task-<p>.`` names in the shared storage, each
    task selecting among its own); one task is unscoped, so a checkpoint written before
    scale-out restores as task 0 of one task."""
    from stream.state import StateError
    from stream.task_state import TaskState, task_store

    cfg = config(tmp_path)
    shared = LocalStorage(tmp_path / "shared")
    old = CheckpointStore(shared).write(trained(cfg, 50), {("a", 0): 50, ("b", 0): 50}, reason="before")
    one = task_store(cfg, shared, "i", 0, 1)
    assert one.names() == [old.name]
    t0, t1 = task_store(cfg, shared, "i", 0, 2), task_store(cfg, shared, "i", 1, 2)
    assert t0.names() == [] and t1.names() == []
    w1 = t1.write(trained(cfg, 20), {("a", 1): 20, ("b", 1): 20}, reason="t1")
    assert t1.names() == [w1.name] and t0.names() == []
    assert f"task-1.{w1.name}" in shared.names()
    # Restoring task 1 at its committed offsets: its own checkpoint, the rest relearned silently.
    ts = TaskState(1, cfg, t1, [("a", 1), ("b", 1)], (), None, None, lambda *a, **k: None)
    start = ts.restore({("a", 1): 25, ("b", 1): 20}, {("a", 1): 0, ("b", 1): 0}, build_learners(cfg), None)
    assert start == {("a", 1): 20, ("b", 1): 20} and ts.catchup == {("a", 1): 25} and ts.relearn == 5
    assert ts.restored is not None and ts.restored.name == w1.name
    assert [lr.n_learned for lr in ts.learners] == [20, 20]
    # Task 0 has committed offsets but no checkpoint of its own: refused, never a fresh model there.
    with pytest.raises(StateError, match="no checkpoint"):
        TaskState(0, cfg, t0, [("a", 0)], (), None, None, lambda *a, **k: None).restore(
            {("a", 0): 7}, {("a", 0): 0}, build_learners(cfg), None)


def test_a_global_partition_another_task_publishes_bounds_nothing_and_is_never_committed(tmp_path: Path) -> None:
    """A task learns the global partitions other tasks publish silently: their positions live
    in its checkpoints only, so any checkpoint position there is consistent, and they are
    left out of the offsets it commits."""
    from stream.task_state import TaskState, task_store

    cfg = config(tmp_path)
    store = task_store(cfg, LocalStorage(tmp_path / "s"), "i", 1, 2)
    info = store.write(trained(cfg, 10), {("a", 1): 10, ("prices", 0): 400}, reason="t")
    ts = TaskState(1, cfg, store, [("a", 1), ("prices", 0)], {("prices", 0)}, None, None, lambda *a, **k: None)
    start = ts.restore({("a", 1): 10}, {("a", 1): 0, ("prices", 0): 0}, build_learners(cfg), None)
    assert ts.restored is not None and ts.restored.name == info.name
    assert start == {("a", 1): 10, ("prices", 0): 400} and not ts.catchup
    assert ts.to_commit({("a", 1): 12, ("prices", 0): 450}) == {("a", 1): 12}
