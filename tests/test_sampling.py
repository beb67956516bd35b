"""SamplingParams: validation, per-call overrides, and each engine's field
names; the legacy max_tokens/temperature spellings; the config reaching the
supervised child; llm.openai_server's field vetting. No engine runs here (the
engine tests show the fields take effect: test_llamacpp_engine.py,
test_remote_engine.py, test_remote_vllm.py, test_vllm_engine.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from llm import sampling
from llm.base import GenerationRequest
from llm.config import LLMConfig, SpeculationConfig
from llm.openai_server import BadRequest, _check_fields, _parse, build_parser, config_from_args, config_from_json
from llm.sampling import SamplingError, SamplingParams, add_sampling_arguments, sampling_from_args
from llm.supervisor import child_config_json

# Every field away from its default: what the engine tests send.
EVERYTHING = SamplingParams(
    temperature=0.7,
    top_p=0.9,
    top_k=7,
    min_p=0.05,
    repetition_penalty=1.15,
    frequency_penalty=0.3,
    presence_penalty=0.25,
    dry_multiplier=0.8,
    dry_base=2.0,
    dry_allowed_length=3,
    dry_penalty_last_n=128,
    stop=("zebra", "\n\n"),
    seed=12345,
    max_tokens=8,
)


def test_defaults_are_valid_and_every_field_round_trips_through_json() -> None:
    default = SamplingParams()
    assert default.max_tokens == 96 and default.temperature == 0.0 and default.stop == ()
    for params in (default, EVERYTHING):
        data = json.loads(json.dumps(params.as_dict()))
        assert SamplingParams.from_dict(data) == params
    assert hash(EVERYTHING)  # frozen and hashable: stop is a tuple


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, r"'temperature' must be in \[0, 2\], got -0.1"),
        ("temperature", 2.5, r"'temperature' must be in \[0, 2\]"),
        ("temperature", math.nan, r"'temperature' must be in \[0, 2\], got nan"),
        ("temperature", "hot", r"'temperature' must be a number in \[0, 2\], got 'hot'"),
        ("temperature", True, r"'temperature' must be a number"),
        ("top_p", 0.0, r"'top_p' must be in \(0, 1\]"),
        ("top_p", 1.5, r"'top_p' must be in \(0, 1\]"),
        ("top_k", -1, r"'top_k' must be an integer >= 0 \(0 disables\), got -1"),
        ("top_k", 2.5, r"'top_k' must be an integer"),
        ("min_p", 1.5, r"'min_p' must be in \[0, 1\]"),
        ("repetition_penalty", 0.0, r"'repetition_penalty' must be in \(0, 2\] \(1 disables\)"),
        ("repetition_penalty", 3.0, r"'repetition_penalty' must be in \(0, 2\]"),
        ("frequency_penalty", 2.5, r"'frequency_penalty' must be in \[-2, 2\]"),
        ("presence_penalty", -3, r"'presence_penalty' must be in \[-2, 2\]"),
        ("dry_multiplier", -1.0, r"'dry_multiplier' must be in \[0, 5\]"),
        ("dry_base", 0.5, r"'dry_base' must be in \[1, 4\]"),
        ("dry_allowed_length", 0, r"'dry_allowed_length' must be an integer in \[1, 64\]"),
        ("dry_penalty_last_n", -1, r"'dry_penalty_last_n' must be an integer in \[0, 32768\] \(0 disables\)"),
        ("seed", -1, r"'seed' must be an integer in \[0, 4294967294\]"),
        ("seed", 2**32, r"'seed' must be an integer in \[0, 4294967294\]"),
        ("max_tokens", 0, r"'max_tokens' must be an integer in \[1, 32768\], got 0"),
        ("stop", ["a"] * 9, r"'stop' takes at most 8 strings, got 9"),
        ("stop", [""], r"each 'stop' entry must be a string of 1\.\.100 characters"),
        ("stop", [3], r"each 'stop' entry must be a string"),
        ("stop", 3, r"'stop' must be a string or a list of strings"),
    ],
)
def test_validation_names_the_field_and_its_range(field: str, value: object, message: str) -> None:
    with pytest.raises(SamplingError, match=message) as caught:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert caught.value.field == field
    # The same check guards per-call overrides.
    with pytest.raises(ValueError, match=message):
        SamplingParams().merged({field: value})


def test_json_numbers_are_normalised() -> None:
    params = SamplingParams(top_k=40.0, temperature=1, stop="END")  # type: ignore[arg-type]
    assert params.top_k == 40 and isinstance(params.top_k, int)
    assert params.temperature == 1.0 and isinstance(params.temperature, float)
    assert params.stop == ("END",)


def test_merged_applies_overrides_and_rejects_unknown_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    base = SamplingParams(repetition_penalty=1.1)
    call = base.merged({"temperature": 0.5, "stop": ["bye"], "seed": 7, "max_tokens": None})
    assert call == dataclasses.replace(base, temperature=0.5, stop=("bye",), seed=7)
    assert base.temperature == 0.0  # frozen: the server default is untouched
    assert base.merged({}) is base and base.merged(None) is base
    assert base.merged({"top_p": None}) == base  # null: keep the default
    with pytest.raises(
        SamplingError, match=r"unknown sampling field 'repeat_penalty' \(did you mean 'repetition_penalty'\?\)"
    ):
        base.merged({"repeat_penalty": 1.2})
    with pytest.raises(SamplingError, match=r"unknown sampling field 'temprature' \(did you mean 'temperature'\?\)"):
        base.merged({"temprature": 1.0})
    with pytest.raises(SamplingError, match="unknown sampling field 'colour'; known fields: dry_allowed_length"):
        base.merged({"colour": "red"})
    with pytest.raises(SamplingError, match="sampling overrides must be an object, got list"):
        base.merged([("temperature", 1.0)])  # type: ignore[arg-type]
    # A client's megabyte key: no fuzzy match (quadratic, on the shared event
    # loop), and the error and its field repeat 64 characters of it, not all.
    matched: list[str] = []
    monkeypatch.setattr(sampling.difflib, "get_close_matches", lambda key, *a, **k: matched.append(key) or [])
    with pytest.raises(SamplingError) as refused:
        base.merged({"temperature" + "x" * 1_000_000: 1.0})
    assert matched == []  # difflib took 0.24 s on this key
    assert refused.value.field == "temperature" + "x" * 53 + "..."
    assert len(str(refused.value)) < 1000 and "did you mean" not in str(refused.value)


def test_llamacpp_field_names() -> None:
    body = EVERYTHING.to_llamacpp(context_tokens=2048)
    assert body == {
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 7,
        "min_p": 0.05,
        "repeat_penalty": 1.15,
        "repeat_last_n": 2048,  # penalties look over the whole context, as in vLLM
        "frequency_penalty": 0.3,
        "presence_penalty": 0.25,
        "dry_multiplier": 0.8,
        "dry_base": 2.0,
        "dry_allowed_length": 3,
        "dry_penalty_last_n": 128,
        "stop": ["zebra", "\n\n"],
        "seed": 12345,
    }
    # Neutral values are sent too (llama.cpp's own defaults are top_k 40,
    # top_p 0.95, min_p 0.05); no seed means llama.cpp's random one.
    neutral = SamplingParams(repetition_penalty=1.0).to_llamacpp(context_tokens=2048)
    assert neutral["top_k"] == 0 and neutral["top_p"] == 1.0 and neutral["min_p"] == 0.0
    assert "seed" not in neutral


def test_vllm_kwargs_and_dry_is_refused() -> None:
    no_dry = dataclasses.replace(EVERYTHING, dry_multiplier=0.0)
    assert no_dry.to_vllm() == {
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 7,
        "min_p": 0.05,
        "repetition_penalty": 1.15,
        "frequency_penalty": 0.3,
        "presence_penalty": 0.25,
        "stop": ["zebra", "\n\n"],
        "seed": 12345,
    }
    assert SamplingParams(top_k=0).to_vllm()["top_k"] == -1  # "off" in every vLLM version
    assert SamplingParams().to_vllm()["stop"] is None
    with pytest.raises(SamplingError, match="vLLM has no DRY sampler") as caught:
        EVERYTHING.to_vllm()
    assert caught.value.field == "dry_multiplier"
    # vLLM's rejection sampler has no min_p: refused up front under speculation.
    no_dry.check_vllm()
    with pytest.raises(SamplingError, match="vLLM cannot apply min_p with speculative decoding") as caught:
        no_dry.check_vllm(speculation=True)
    assert caught.value.field == "min_p"


def test_openai_body_round_trips_and_omits_inert_extras() -> None:
    body = EVERYTHING.to_openai()
    assert body["repetition_penalty"] == 1.15 and body["top_k"] == 7 and body["min_p"] == 0.05
    assert body["dry_multiplier"] == 0.8 and body["dry_penalty_last_n"] == 128
    assert body["stop"] == ["zebra", "\n\n"] and body["seed"] == 12345 and body["max_tokens"] == 8
    # What a RemoteEngine sends, llm.openai_server reads back unchanged.
    assert SamplingParams().from_openai(body) == EVERYTHING
    assert SamplingParams(max_tokens=5).from_openai(SamplingParams(max_tokens=5).to_openai()) == SamplingParams(
        max_tokens=5
    )
    # A strict OpenAI endpoint sees only standard fields unless extras are set.
    plain = SamplingParams(repetition_penalty=1.0).to_openai()
    assert set(plain) == {"max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty"}


def test_from_openai_reads_max_completion_tokens_and_nulls() -> None:
    server = SamplingParams(repetition_penalty=1.1, max_tokens=64)
    got = server.from_openai({"max_tokens": 10, "max_completion_tokens": 20, "temperature": None, "stop": "END"})
    assert got.max_tokens == 20 and got.temperature == 0.0 and got.stop == ("END",)
    assert got.repetition_penalty == 1.1  # the server's default where the body says nothing


def test_generation_request_legacy_fields_still_work() -> None:
    messages = [{"role": "user", "content": "hi"}]
    positional = GenerationRequest("a", messages, 8)
    assert positional.max_tokens == 8 and positional.sampling.max_tokens == 8
    assert positional.sampling == SamplingParams(max_tokens=8)
    legacy = GenerationRequest("b", messages, max_tokens=20, temperature=0.3, sampling=EVERYTHING)
    assert legacy.sampling == dataclasses.replace(EVERYTHING, max_tokens=20, temperature=0.3)
    assert legacy.temperature == 0.3
    assert GenerationRequest("c", messages, sampling=EVERYTHING).sampling is EVERYTHING
    with pytest.raises(SamplingError, match="'max_tokens' must be an integer"):
        GenerationRequest("d", messages, 0)


def test_llm_config_aliases_and_the_supervised_child_gets_the_same_sampling() -> None:
    config = LLMConfig(max_tokens=40, temperature=0.2, sampling=EVERYTHING)
    assert config.sampling == dataclasses.replace(EVERYTHING, max_tokens=40, temperature=0.2)
    assert (config.max_tokens, config.temperature) == (40, 0.2)
    config.temperature = 0.4
    assert config.sampling.temperature == 0.4 and config.sampling.top_k == 7
    assert LLMConfig().sampling == SamplingParams()
    # The child process is started with --config-json from the parent's config.
    child = config_from_json(child_config_json(config))
    assert child.sampling == config.sampling and child.isolation == "inprocess"
    # Older JSON with the loose fields still loads.
    assert config_from_json('{"max_tokens": 12, "temperature": 0.5}').sampling == SamplingParams(
        max_tokens=12, temperature=0.5
    )


def test_sampling_flags() -> None:
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, prefix="llm-")
    args = parser.parse_args(
        ["--llm-repetition-penalty", "1.2", "--llm-stop", "A", "--llm-stop", "B", "--llm-seed", "3"]
    )
    assert sampling_from_args(args, max_tokens=50) == SamplingParams(
        repetition_penalty=1.2, stop=("A", "B"), seed=3, max_tokens=50
    )
    assert sampling_from_args(parser.parse_args([])) == SamplingParams()
    with pytest.raises(SamplingError, match=r"'top_p' must be in \(0, 1\]"):
        sampling_from_args(parser.parse_args(["--llm-top-p", "2"]))
    # llm.openai_server's own flags (un-prefixed) feed its defaults.
    served = config_from_args(build_parser().parse_args(["--dry-multiplier", "0.5", "--max-tokens", "30"]))
    assert served.sampling == SamplingParams(dry_multiplier=0.5, max_tokens=30)


def test_voice_cli_sampling_flags() -> None:
    from voice.server.cli import build_parser as voice_parser
    from voice.server.cli import config_from_args as voice_config

    args = voice_parser().parse_args(["serve", "--max-tokens", "64", "--llm-temperature", "0.3", "--llm-top-k", "20"])
    config = voice_config(args)
    assert config.llm.sampling == SamplingParams(temperature=0.3, top_k=20, max_tokens=64)
    assert voice_config(voice_parser().parse_args(["serve"])).llm.sampling == SamplingParams()


# -- llm.openai_server's vetting of a chat-completions body -------------------

MESSAGES = [{"role": "user", "content": "hi"}]


def test_openai_server_parses_every_sampling_field() -> None:
    body = {"model": "x", "messages": MESSAGES, "stream": True, "user": "u", **EVERYTHING.to_openai()}
    request, stream, include_usage = _parse(body, SamplingParams())
    assert request.sampling == EVERYTHING and stream and not include_usage
    # Fields a body leaves out come from the server's defaults.
    request, *_ = _parse({"messages": MESSAGES, "temperature": 0.5}, SamplingParams(repetition_penalty=1.1))
    assert request.sampling == SamplingParams(repetition_penalty=1.1, temperature=0.5)


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"n": 2}, "n", "'n' must be 1"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "'logit_bias' is not supported"),
        ({"logprobs": True}, "logprobs", "'logprobs' is not supported"),
        ({"top_logprobs": 3}, "top_logprobs", "'top_logprobs' is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tool calling"),
        ({"tool_choice": "required"}, "tool_choice", "no tool calling"),
        ({"response_format": {"type": "json_object"}}, "response_format", "no structured output"),
        ({"modalities": ["text", "audio"]}, "modalities", "text replies only"),
        ({"best_of": 2}, "best_of", "unsupported field 'best_of'"),
        ({"k" * 100_000: 1}, "k" * 64 + "...", "unsupported field 'k{64}\\.\\.\\.'; known fields"),
        ({"repeat_penalty": 1.1}, "repeat_penalty", r"did you mean 'repetition_penalty'\?"),
        ({"temperature": 5}, "temperature", r"'temperature' must be in \[0, 2\], got 5"),
        ({"max_tokens": -3}, "max_tokens", "'max_tokens' must be an integer"),
        ({"stop": [1, 2]}, "stop", "each 'stop' entry must be a string"),
        ({"seed": "x"}, "seed", "'seed' must be an integer"),
        # A text part whose text is no string was a TypeError: a 500, which
        # a pooled client reads as the server being down.
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages", "must be a string"),
    ],
)
def test_openai_server_refuses_what_it_cannot_honour(extra: dict, param: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        _parse({"messages": MESSAGES, **extra}, SamplingParams())
    assert caught.value.param == param


def test_openai_server_accepts_the_off_values_clients_send() -> None:
    body = {
        "messages": MESSAGES,
        "n": 1,
        "logprobs": False,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": None,
        "parallel_tool_calls": True,
        "service_tier": "auto",
        "modalities": ["text"],
    }
    request, *_ = _parse(body, SamplingParams())
    assert request.sampling == SamplingParams()


def test_a_supervised_vllm_child_refuses_dry_in_the_parent() -> None:
    from llm.base import EngineError
    from llm.supervisor import SupervisedEngine

    dry = SamplingParams(dry_multiplier=0.5)
    with pytest.raises(EngineError, match="vLLM has no DRY sampler"):
        SupervisedEngine(LLMConfig(engine="vllm", sampling=dry))  # nothing is started
    engine = SupervisedEngine(LLMConfig(engine="llamacpp", sampling=dry))
    engine.check_sampling(dry)  # llama.cpp has DRY
    speculating = SupervisedEngine(LLMConfig(engine="vllm", speculation=SpeculationConfig(method="ngram")))
    with pytest.raises(EngineError, match="min_p with speculative decoding"):
        speculating.check_sampling(SamplingParams(min_p=0.05))  # e.g. a caller's per-call override


def test_a_full_body_carries_off_values_past_the_servers_defaults() -> None:
    """The supervised child fills a missing field with its own default, so a
    call's "off" must be sent: with full=True it survives the round trip."""
    server = SamplingParams(repetition_penalty=1.1, top_k=40, min_p=0.05, stop=("x",), dry_multiplier=0.8)
    call = SamplingParams(repetition_penalty=1.0)
    body = call.to_openai(full=True)
    _check_fields({"messages": [{"role": "user", "content": "hi"}], **body})  # the child takes every field
    assert server.from_openai(body) == call
    # The short form (for strict OpenAI servers) loses them, which is why the child gets the full one.
    assert server.from_openai(call.to_openai()) != call


def test_huge_numbers_are_a_sampling_error_not_a_crash() -> None:
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams().merged({"temperature": 10**400})
    with pytest.raises(SamplingError, match="top_k"):
        SamplingParams().merged({"top_k": 10**30})
