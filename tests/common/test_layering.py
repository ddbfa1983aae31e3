"""The layers import downwards only: `common/` needs neither `gateway/` nor `services/`, and the
gateway needs nothing from `services/`.

Read from the source rather than from `sys.modules`, so that an import inside a function (one an
import-time check would never run) breaks the rule just as loudly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FORBIDDEN = {"common": {"gateway", "services"}, "gateway": {"services"}}


def _imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in one source file."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_downwards(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in files
        for line, name in sorted(_imported_packages(path))
        if name in FORBIDDEN[package]
    ]
    assert wrong == [], "\n".join(wrong)
