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
        (["--audiosocket-port", "8765"], "--audiosocket-port 8765 is --port's on the same address"),
        (["--host", "0.0.0.0", "--audiosocket-port", "8765"], "is --port's on the same address"),
        (["--audiosocket-port", "70000"], "--audiosocket-port must be 0-65535"),
        (["--log-level", "verbose"], "--log-level"),
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
    split = parse_args(["serve", "--host", "10.0.0.5", "--audiosocket-port", "8765"])
    assert split.audiosocket_port == 8765
    assert parse_args(["serve", "--port", "0", "--audiosocket-port", "0"]).audiosocket_port == 0
    monkeypatch.setenv("FIRSTLINE_PORT", "9000")
    monkeypatch.setenv("FIRSTLINE_ENGINE", "remote")
    args = parse_args(["serve", "--log-level", "debug", "--max-asr-queue", "0"])
    assert (args.port, args.engine, args.log_level, args.max_asr_queue) == (9000, "remote", "DEBUG", 0)
