"""Installed from a wheel and started outside the repository, ``stream`` finds its default
configuration (packaged, ``stream/default.toml``), and a missing configuration or one
without learners is an error that names what is missing, never a silent empty run.

The wheel is built from this checkout (``pip wheel --no-deps``) and installed with
``--no-deps`` into a fresh venv (no system site-packages). Its dependencies (River,
numpy, confluent-kafka ...) come from this project's venv through a plain path entry
(``deps.pth``): a path line, not a site directory, so the editable install of ``stream``
there (a ``.pth`` import hook) is *not* seen: ``import stream`` can only find the wheel's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LEARNERS = ("basket_size", "pricing", "risk", "recommendation", "demand", "ranking")


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STREAM_BOOTSTRAP_SERVERS")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``bin/`` of a fresh venv with the wheel of this checkout installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheels, venv = tmp / "dist", tmp / "venv"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                 str(ROOT)], cwd=tmp)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("stream-*.whl")
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    assert made.returncode == 0, made.stderr
    site = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=tmp).stdout.strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps"]
    done = run([*pip, str(wheel)], cwd=tmp)
    assert done.returncode == 0, done.stderr
    yield venv / "bin"


def test_the_wheel_carries_the_default_config_and_the_venv_sees_only_the_wheel(installed: Path, tmp_path: Path) -> None:
    probe = run([str(installed / "python"), "-c", "import stream, stream.config as c; print(stream.__file__); "
                 "print(len(c.default_config_text()))"], cwd=tmp_path)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    where, size = probe.stdout.split()
    assert Path(where).is_relative_to(installed.parent), where  # the wheel's copy, not the checkout
    assert int(size) == len((ROOT / "stream" / "default.toml").read_text(encoding="utf-8"))
    # One source of truth: the repository's configs/default.toml is the packaged file.
    assert (ROOT / "configs" / "default.toml").resolve() == (ROOT / "stream" / "default.toml").resolve()


def test_demo_from_anywhere_runs_the_default_learners(installed: Path, tmp_path: Path) -> None:
    result = run([str(installed / "stream"), "demo", "--events", "2000", "--metrics-port", "0", "--no-progress"],
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    header = result.stdout.splitlines()[0]
    assert f"-> {len(DEFAULT_LEARNERS)} learners from the packaged default.toml" in header, header
    for name in DEFAULT_LEARNERS:
        assert name in header, name
    assert "none" not in header


def test_a_missing_config_is_an_error_naming_it(installed: Path, tmp_path: Path) -> None:
    for command in (["demo", "--events", "2000"], ["run"], ["backtest", "rec"]):
        result = run([str(installed / "stream"), *command, "--config", "nope.toml"], cwd=tmp_path)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "nope.toml: no such file" in result.stderr, result.stderr


def test_a_config_without_learners_is_an_error(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text('[kafka]\ngroup_id = "g"\n')
    for command in (["demo", "--events", "2000"], ["run"]):
        result = run([str(installed / "stream"), *command, "--config", "empty.toml", "--metrics-port", "0"],
                     cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "empty.toml: no learners configured" in result.stderr, result.stderr
