"""Every FIRSTLINE_* variable the code or the deploy files read is named in
docs/environment.md: an operator finds each setting the server takes from
its environment in one place (variables the code read and no page named
went unnoticed). Source only, no server."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bFIRSTLINE_[A-Z][A-Z0-9_]*\b")
# The CLI reads its variables by their names' ends (_env with "HOST" for
# FIRSTLINE_HOST): the prefix is added there.
CLI_ENV = re.compile(r"""\b_env\(\s*["']([A-Z][A-Z0-9_]*)["']""")
# A Python constant named FIRSTLINE_..., not an environment variable.
NOT_VARIABLES = {"FIRSTLINE_BASE"}


def _read_by_code() -> dict[str, str]:
    found: dict[str, str] = {}
    packages = ("asr", "llm", "voice", "streaming", "benchmarks", "tests", "samples", "scripts")
    sources = [path for package in packages for path in (ROOT / package).rglob("*") if path.suffix in (".py", ".sh")]
    sources += [ROOT / "deploy" / "haproxy.cfg", ROOT / "Makefile", ROOT / ".ci" / "run"]
    for path in sources:
        text = path.read_text()
        names = set(NAME.findall(text)) | {f"FIRSTLINE_{n}" for n in CLI_ENV.findall(text)}
        for name in names - NOT_VARIABLES:
            found.setdefault(name, str(path.relative_to(ROOT)))
    return found


# Standard variables the server reads by their own names.
OTHER_VARIABLES = ("TWILIO_AUTH_TOKEN", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    documented = set(NAME.findall((ROOT / "docs" / "environment.md").read_text()))
    read = _read_by_code()
    assert "FIRSTLINE_HOST" in read and "FIRSTLINE_REMOTE_API_KEY" in read  # the scan sees both spellings
    missing = {name: where for name, where in read.items() if name not in documented}
    assert not missing, f"read by the code, not in docs/environment.md: {missing}"
    page = (ROOT / "docs" / "environment.md").read_text()
    server = "".join(path.read_text() for path in (ROOT / "voice").rglob("*.py"))
    for name in OTHER_VARIABLES:
        assert name in server, f"{name} is no longer read: take it off docs/environment.md and this list"
        assert f"`{name}`" in page, f"{name} is read by the server, not in docs/environment.md"
