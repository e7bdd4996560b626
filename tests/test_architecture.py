"""The import rule of docs/architecture.md: a module imports only from layers below its own.

The layer table in the doc is the one source of truth; this test reads it, so a new module must be
placed there, and an upward or sideways import (the start of a cycle) fails here with the line to fix.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stream"
DOC = ROOT / "docs" / "architecture.md"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _short(module: str) -> str:
    return module.removeprefix("stream.") if module != "stream" else "stream"


def layers() -> dict[str, int]:
    """Module (short name, ``learners.risk``) -> layer, from the doc's layer table."""
    out: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        m = re.fullmatch(r"\|\s*(\d+)\s*\|(.*)\|", line.strip())
        if m:
            for name in re.findall(r"`([^`]+)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``stream`` module, inside functions too."""
    found: list[tuple[int, str]] = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            if base == "stream" or base.startswith("stream."):
                # ``from stream import faults`` imports the module stream.faults, not the package.
                subs = [f"{base}.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()]
                found.extend((node.lineno, m) for m in (subs if base == "stream" and subs else [base]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "stream")
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    """Imports of ``path`` that do not point to a lower layer."""
    table = layers()
    me = _short(_module_name(path))
    own = table[me]
    return [
        f"{path.relative_to(ROOT)}:{line} imports {_short(dep)} (layer {table.get(_short(dep))}, {me} is layer {own})"
        for line, dep in imports(path, source)
        if _short(dep) != me and table.get(_short(dep), own) >= own
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    table = layers()
    missing = [_short(_module_name(p)) for p in MODULES if _short(_module_name(p)) not in table]
    assert not missing, f"add these modules to the layer table of {DOC.name}: {missing}"
    stale = sorted(set(table) - {_short(_module_name(p)) for p in MODULES})
    assert not stale, f"the layer table of {DOC.name} names modules that do not exist: {stale}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _short(_module_name(p)))
def test_imports_point_down(path: Path) -> None:
    wrong = violations(path)
    assert not wrong, "imports must point to lower layers (docs/architecture.md):\n" + "\n".join(wrong)


def test_the_rule_catches_upward_sideways_and_hidden_imports() -> None:
    events = PACKAGE / "events.py"
    hidden_upward = events.read_text() + "\n\ndef _oops() -> None:\n    from stream.app import Application\n"
    assert violations(events) == []
    assert any("imports app" in v for v in violations(events, hidden_upward))
    sideways = (PACKAGE / "kafka.py").read_text() + "\nfrom stream import state\n"
    assert any("imports state" in v for v in violations(PACKAGE / "kafka.py", sideways))
