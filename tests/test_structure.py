"""The package's shape: no import cycle between its packages, no lock for anyone else."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "intercom"


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    """Package to the packages its modules import at module level (run time only)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = _package_of(".".join(p for p in parts if p != "__init__"))
        for node in ast.parse(path.read_text()).body:  # not TYPE_CHECKING, not local
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                target = _package_of(name)
                if name.startswith("intercom.") and target != source:
                    edges.setdefault(source, set()).add(target)
    return edges


def test_no_import_cycle_between_packages() -> None:
    edges = import_graph()
    cycles = []
    for start in edges:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    cycles.append(path)
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_only_the_station_and_the_verifier_name_the_lock() -> None:
    users = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if "hardware.lock import" in p.read_text() and p.parent.name != "hardware"
    )
    assert users == ["security/verifier.py", "station.py"]
