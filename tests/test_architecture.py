"""The layout's import rules (voice/__init__.py, docs/architecture.md),
checked on the source so a change that breaks one fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOICE = ROOT / "voice"
# Modules every transport may share; everything else under voice.transports
# belongs to exactly one transport.
TRANSPORT_BASES = {"voice.transports.telephony", "voice.transports.media_json", "voice.transports"}
CARRIER_SHARED = {"voice.transports.carriers", "voice.transports.carriers.parameters"}
# The only server modules that know the transports: they route to them.
SERVER_ROUTERS = {"voice.server.app", "voice.server.routes", "voice.server.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; the rules here read absolute ones")
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # "from voice.transports.realtime import session": the submodules too.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("voice")}


def _transport_of(module: str) -> str | None:
    """Which transport a voice.transports module belongs to (None: a shared base)."""
    if module in TRANSPORT_BASES or module in CARRIER_SHARED:
        return None
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "transports":
        return None
    if parts[2] == "carriers":
        return ".".join(parts[:4]) if len(parts) > 3 else None
    return ".".join(parts[:3])


MODULES = {_module_name(p): p for p in VOICE.rglob("*.py")}


def _module_of(imported: str) -> str:
    """The module an imported name lives in: itself if it is a module
    ("from voice.transports.carriers import telnyx"), else its parent
    ("from voice.transports.media_json import WebSocketCall")."""
    return imported if imported in MODULES else imported.rsplit(".", 1)[0]


def test_the_layout_has_its_three_concerns() -> None:
    assert {"voice.call.session", "voice.call.turn", "voice.call.history"} <= MODULES.keys()
    assert {"voice.server.app", "voice.server.admission", "voice.server.limits", "voice.server.cli"} <= MODULES.keys()
    transports = {_transport_of(m) for m in MODULES} - {None}
    assert len(transports) == 10, sorted(t for t in transports if t)


def test_no_transport_imports_a_sibling_transport() -> None:
    offences = []
    for module, path in MODULES.items():
        own = _transport_of(module)
        if not module.startswith("voice.transports"):
            continue
        for imported in _imports(path):
            other = _transport_of(_module_of(imported))
            if other is not None and other != own:
                offences.append(f"{module} imports {imported}")
    assert not offences, offences


# The shared engines a call runs on (and the tracer a turn reports to).
ALLOWED_FOR_CALL = {"voice.server.runtime", "voice.server.tracing"}


def _within(imported: str, modules: set[str]) -> bool:
    """``imported`` is one of ``modules``, a name from one, or their package."""
    return imported == "voice.server" or imported in modules or imported.rsplit(".", 1)[0] in modules


def test_the_call_knows_no_transport_and_no_server_but_its_runtime() -> None:
    offences = []
    for module, path in MODULES.items():
        if not module.startswith("voice.call"):
            continue
        for imported in _imports(path):
            if imported.startswith("voice.transports"):
                offences.append(f"{module} imports {imported}")
            if imported.startswith("voice.server") and not _within(imported, ALLOWED_FOR_CALL):
                offences.append(f"{module} imports {imported}")
    assert not offences, offences


def test_only_the_router_modules_of_the_server_know_transports() -> None:
    offences = [
        f"{module} imports {imported}"
        for module, path in MODULES.items()
        if module.startswith("voice.server") and module not in SERVER_ROUTERS
        for imported in _imports(path)
        if imported.startswith("voice.transports")
    ]
    assert not offences, offences


def test_a_turn_does_not_reach_into_its_session() -> None:
    source = (VOICE / "call" / "turn.py").read_text()
    assert "CallSession" not in source
    assert "voice.call.session" not in _imports(VOICE / "call" / "turn.py")


def test_the_pipeline_packages_do_not_import_the_server() -> None:
    offences = [
        f"{path.relative_to(ROOT)} imports {imported}"
        for package in ("asr", "llm", "streaming")
        for path in (ROOT / package).rglob("*.py")
        for imported in _imports(path)
    ]
    assert not offences, offences
