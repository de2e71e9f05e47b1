"""No product module imports another module's private (underscore) name: a name shared between modules
is made public where it is defined, so the layering stays visible and a rename is caught by lint.

Ruff's import-private-name rule (PLC2701) only looks at third-party modules, so this walks our own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "gateway", "runner", "cli")


def private_imports(source: str) -> list[tuple[int, str, str]]:
    """(line, module, name) for each `from <absolute module> import _name` in the source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((node.lineno, node.module, alias.name))
    return found


def test_the_check_sees_a_private_import() -> None:
    assert private_imports("from api.x import _A, b\nfrom api.y import c as _c\n") == [(1, "api.x", "_A")]


def test_no_product_module_imports_a_private_name() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {name} from {module}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module, name in private_imports(path.read_text())
    ]
    assert offenders == []
