"""The command line refuses what it cannot serve, at once and in words:
FIRSTLINE_* variables outside a flag's choices (argparse checks choices only
on typed values) and numbers that would start a server refusing every call."""

from __future__ import annotations

import pytest

from voice.server.cli import parse_args


@pytest.mark.parametrize(
    ("variable", "value", "flag"),
    [
        ("FIRSTLINE_ENGINE", "vLLM", "--engine"),
        ("FIRSTLINE_END_OF_TURN", "smartturn", "--end-of-turn"),
        ("FIRSTLINE_LOG_FORMAT", "JSON", "--log-format"),
        ("FIRSTLINE_LLM_DEVICE", "gpu", "--llm-device"),
    ],
)
def test_a_variable_outside_a_flags_choices_is_refused(monkeypatch, capsys, variable, value, flag) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        parse_args(["serve"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err, err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--max-calls", "0"], "--max-calls must be 1 or more"),
        (["--max-asr-queue", "-1"], "--max-asr-queue must be 0 or more"),
        (["--llm-prompt-cache-mib", "-1"], "--llm-prompt-cache-mib must be 0 or more"),
        (["--port", "70000"], "--port must be 0-65535"),
        (["--llm-first-token-timeout-s", "0"], "--llm-first-token-timeout-s must be more than 0"),
        (["--llm-first-token-timeout-s", "nan"], "--llm-first-token-timeout-s must be more than 0"),
        (["--audiosocket-port", "8765"], "--audiosocket-port 8765 is --port's on the same address"),
        (["--host", "0.0.0.0", "--audiosocket-port", "8765"], "is --port's on the same address"),
        (["--audiosocket-port", "70000"], "--audiosocket-port must be 0-65535"),
        (["--log-level", "verbose"], "--log-level"),
        (["--trusted-proxy", "0.0.0.0/0"], "too wide to trust"),
        (["--trusted-proxy", "::/0"], "too wide to trust"),
    ],
)
def test_numbers_that_would_refuse_every_call_are_refused_at_start(capsys, argv, says) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", *argv])
    assert says in capsys.readouterr().err


def test_a_bad_port_variable_is_a_usage_error_and_good_values_pass(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FIRSTLINE_PORT", "abc")
    with pytest.raises(SystemExit):
        parse_args(["serve"])
    assert "--port" in capsys.readouterr().err
    monkeypatch.setenv("FIRSTLINE_PORT", "")  # an empty variable (a compose template) is no port given
    assert parse_args(["serve"]).port == 8765
    # One port number on two addresses is two listeners; 0 is any free port.
    split = parse_args(["serve", "--host", "10.0.0.5", "--audiosocket-port", "8765", "--auth-token", "t"])
    assert split.audiosocket_port == 8765
    assert parse_args(["serve", "--port", "0", "--audiosocket-port", "0"]).audiosocket_port == 0
    monkeypatch.setenv("FIRSTLINE_PORT", "9000")
    monkeypatch.setenv("FIRSTLINE_ENGINE", "remote")
    args = parse_args(["serve", "--log-level", "debug", "--max-asr-queue", "0"])
    assert (args.port, args.engine, args.log_level, args.max_asr_queue) == (9000, "remote", "DEBUG", 0)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 listens beyond this machine, and no --auth-token"),
        (["--host", "10.0.0.5"], "anyone who reaches the port could place calls"),
        (["--host", ""], "--host (all) listens beyond this machine"),
        (["--host", "voice.example.com"], "--no-auth"),
        # AudioSocket carries no credential: a public bind needs its allow-list.
        (["--audiosocket-port", "9092", "--audiosocket-host", "0.0.0.0"], "--audiosocket-allow CIDR"),
    ],
)
def test_a_listener_open_beyond_this_machine_with_no_credential_is_refused(monkeypatch, capsys, argv, says) -> None:
    monkeypatch.delenv("FIRSTLINE_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("FIRSTLINE_NO_AUTH", raising=False)
    with pytest.raises(SystemExit) as exited:
        parse_args(["serve", *argv])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_a_public_bind_starts_with_a_token_or_when_told_to(monkeypatch) -> None:
    monkeypatch.delenv("FIRSTLINE_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("FIRSTLINE_NO_AUTH", raising=False)
    for loopback in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert parse_args(["serve", "--host", loopback]).host == loopback
    assert parse_args(["serve", "--host", "0.0.0.0", "--auth-token", "s3cret"]).auth_token == "s3cret"
    assert parse_args(["serve", "--host", "0.0.0.0", "--no-auth"]).no_auth
    assert parse_args(["serve", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "fd00::/32"]).trusted_proxy
    open_pbx = ["--audiosocket-port", "9092", "--audiosocket-host", "0.0.0.0", "--audiosocket-allow", "10.0.0.0/8"]
    assert parse_args(["serve", *open_pbx]).audiosocket_allow
    monkeypatch.setenv("FIRSTLINE_NO_AUTH", "1")
    assert parse_args(["serve", "--host", "0.0.0.0"]).no_auth
    monkeypatch.setenv("FIRSTLINE_NO_AUTH", "")
    monkeypatch.setenv("FIRSTLINE_AUTH_TOKEN", "from-the-environment")
    assert parse_args(["serve", "--host", "::"]).auth_token == "from-the-environment"


def test_the_open_files_limit_is_raised_toward_what_a_server_needs() -> None:
    """Each call, handshake and HTTP request holds a descriptor; a soft limit
    of 1,024 is what many systems start a process with."""
    import resource

    from streaming.open_files import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        now = raise_open_files_limit(4096)
        assert now == min(4096, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_open_files_limit(512) == now  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
