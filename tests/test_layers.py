"""The layers drawn in docs/architecture.md, kept true: which package of relay/ may import which.

Read from the code's own imports (every `import` and `from ... import`, inside functions and
under TYPE_CHECKING too, since each is a dependency of the design), so a forbidden edge fails
here before it becomes a habit. Also: no module reaches into a dependency's private names
except behind a source-hash guard.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "relay"

BASE = {
    "relay.config",
    "relay.settings",
    "relay.errors",
    "relay.logs",
    "relay.metrics",
    "relay.holdrules",
    "relay.formdefs",
}

# layer -> the layers it may import (itself included). Read bottom-up.
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "mail": {"base", "mail"},
    "mail.attempt": {"base"},
    "store": {"base", "store", "mail.attempt"},
    "worker": {"base", "mail", "store", "worker"},
    "web": {"base", "mail", "store", "web"},
    "ops": {"base", "mail", "store", "worker", "web", "ops", "sandbox"},
    "sandbox": {"base", "sandbox"},
    # relay/__init__.py, the composition root of `gunicorn "relay:create_app()"`: builds the web
    # app (imported lazily) and hands it the doctor's checks from ops.
    "face": {"base", "web", "ops"},
}

# Modules allowed to use a dependency's private names, each guarded by a digest of the exact
# source it mirrors (and falling back to the public API when the digest differs).
GUARDED = {"relay/mail/dnswire.py": "dnspython"}
# Names with a leading underscore that are documented public API all the same.
DOCUMENTED = {"os._exit"}  # leave now, without cleanup (the worker's second signal)


def layer_of(module: str) -> str:
    """The layer of a relay module name; "mail.attempt" is a layer of its own for the store."""
    if module in BASE:
        return "base"
    if module == "relay":
        return "face"
    if module == "relay.mail.attempt":
        return "mail.attempt"
    if module == "relay.alerts" or module == "relay.worker" or module.startswith("relay.worker."):
        return "worker"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in {"mail", "store", "web", "ops", "sandbox"}:
        return parts[1]
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_relay(module: str | None) -> bool:
    return module is not None and (module == "relay" or module.startswith("relay."))


def relay_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every relay module the file imports."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("relay")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_relay(node.module):
            # `from relay.mail import smtp` imports relay.mail.smtp.
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split(".")).with_suffix(".py")).exists()
                found.append((node.lineno, candidate if is_module else str(node.module)))
    return found


def edge_allowed(source: str, target: str) -> bool:
    allowed = ALLOWED[layer_of(source)]
    target_layer = layer_of(target)
    if target_layer == "mail.attempt":
        return "mail" in allowed or "mail.attempt" in allowed
    return target_layer in allowed


SOURCES = sorted(p for p in RELAY.rglob("*.py") if "migrations" not in p.parts)


def test_every_module_belongs_to_a_layer() -> None:
    for path in SOURCES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    source = module_name(path)
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {target} "
        f"({layer_of(source)} -> {layer_of(target)})"
        for line, target in relay_imports(path)
        if not edge_allowed(source, target)
    ]
    assert not wrong, "forbidden edge(s):\n" + "\n".join(wrong)


def test_the_contract_refuses_the_edges_the_design_forbids() -> None:
    """The table itself says no to mail -> store, mail -> web, store -> web, anything -> ops."""
    assert not edge_allowed("relay.mail.smtp", "relay.store.outbox")
    assert not edge_allowed("relay.mail.smtp", "relay.web.forms")
    assert not edge_allowed("relay.store.outbox", "relay.web.app")
    assert not edge_allowed("relay.store.outbox", "relay.mail.smtp")
    for layer_module in ("relay.config", "relay.mail.mx", "relay.store.log", "relay.worker"):
        assert not edge_allowed(layer_module, "relay.ops.doctor")
    assert not edge_allowed("relay.web.views", "relay.ops.cli")
    assert not edge_allowed("relay.sandbox.dns", "relay.store.outbox")
    assert edge_allowed("relay.store.records", "relay.mail.attempt")
    assert edge_allowed("relay.ops.cli", "relay.worker")


def _private_uses(path: Path) -> list[str]:
    """`module._name` and `from module import _name` for third-party modules."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    uses: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in ("relay", "__future__"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    uses.append(f"{node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
    modules.discard("relay")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__"):
                continue
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            named = isinstance(base, ast.Name) and base.id in modules
            if named and ast.unparse(node) not in DOCUMENTED:
                uses.append(f"{node.lineno}: {ast.unparse(node)}")
    return uses


def test_no_private_names_of_dependencies_outside_guarded_modules() -> None:
    found = {
        str(path.relative_to(ROOT)): uses
        for path in SOURCES
        if (uses := _private_uses(path)) and str(path.relative_to(ROOT)) not in GUARDED
    }
    assert not found, f"private names of dependencies, unguarded: {found}"


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_guarded_modules_check_a_source_digest(name: str) -> None:
    text = (ROOT / name).read_text()
    assert "hashlib.sha256" in text
    assert "inspect.getsource" in text
