"""The layers of relay/ (see each package's docstring), enforced on every import, also those
made inside functions: the bottom (config, errors, logs, metrics, holdrules), mail, store,
then the worker and alerts, the web, and ops on top. The package face (relay/__init__.py) is
the composition root: it builds the web app and hands it the doctor's checks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "relay"
BOTTOM = {"relay.config", "relay.errors", "relay.logs", "relay.metrics", "relay.holdrules"}
MAIL = {"relay.mail"}
STORE = {"relay.store"}
# Who may import what: a module's layer is the longest prefix listed here.
ALLOWED: dict[str, set[str]] = {
    "relay.config": {"relay.errors", "relay.holdrules"},
    "relay.errors": set(),
    "relay.logs": set(),
    "relay.metrics": set(),
    "relay.holdrules": {"relay.errors"},
    "relay.mail": BOTTOM | MAIL,
    "relay.store": BOTTOM | STORE | {"relay.mail.attempt"},
    "relay.worker": BOTTOM | MAIL | STORE | {"relay.alerts"},
    "relay.alerts": BOTTOM | MAIL | STORE,
    "relay.web": BOTTOM | MAIL | STORE | {"relay.web"},
    "relay.sandbox": BOTTOM - {"relay.metrics", "relay.holdrules"} | {"relay.sandbox"},
    "relay.ops": {"relay"},
    "relay": {"relay.web", "relay.ops", "relay.config"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> str:
    return max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
            found.add(node.module)
    return {name for name in found if name == "relay" or name.startswith("relay.")}


def allowed(target: str, rules: set[str]) -> bool:
    return any(target == r or target.startswith(r + ".") for r in rules) or any(
        r.startswith(target + ".")
        for r in rules  # `from relay import config` names relay
    )


SOURCES = sorted(p for p in RELAY.rglob("*.py") if "migrations" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_stay_within_the_layer(path: Path) -> None:
    name = module_name(path)
    rules = ALLOWED[layer_of(name)] | {name}
    wrong = sorted(t for t in imports(path) if not allowed(t, rules) and t != name)
    assert wrong == [], f"{name} ({layer_of(name)}) imports {wrong}"


def test_every_package_is_assigned_a_layer() -> None:
    for path in SOURCES:
        assert layer_of(module_name(path)) != "relay" or path.parent == RELAY
