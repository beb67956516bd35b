"""One sampling configuration for every engine and every path.

:class:`SamplingParams` is what a reply is sampled with: server-wide defaults
live in :class:`~llm.config.LLMConfig` (``config.sampling``), a call may
override fields with :meth:`SamplingParams.merged` (a JSON-ish dict: the
native ``start.options.sampling``, a Realtime ``session.update``), and each
:class:`~llm.base.GenerationRequest` carries the result. Every engine
translates the same object into its own API, so a setting means the same
thing whichever engine answers:

* :meth:`~SamplingParams.to_llamacpp`: llama.cpp server fields (in-process
  ``xllamacpp``);
* :meth:`~SamplingParams.to_vllm`: ``vllm.SamplingParams`` keyword arguments
  (in-process vLLM);
* :meth:`~SamplingParams.to_openai`: chat-completions body fields, for remote
  OpenAI-compatible servers (``vllm serve``, our ``llm.openai_server``), which
  parses them back with :meth:`~SamplingParams.from_openai`.

Where the engines differ underneath (documented so nobody is surprised):
``repetition_penalty`` covers the whole prompt and reply on both (llama.cpp
is given its slot's context as ``repeat_last_n``), but llama.cpp applies
frequency/presence penalties over that same window while vLLM counts the
reply only. DRY exists in llama.cpp only: vLLM engines refuse a request that
enables it rather than silently ignoring it (``vllm serve`` as a remote
ignores unknown fields, which a client cannot detect).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streaming.shown import shown_value

# llama.cpp reads a seed as uint32 and takes 0xFFFFFFFF as "random"; the same
# range everywhere keeps a seeded reply reproducible on every engine.
MAX_SEED = 2**32 - 2
# Stop strings: OpenAI allows 4; a few more cost nothing here, hundreds would
# be a client bug (each is matched against every streamed token).
MAX_STOP = 8
MAX_STOP_CHARS = 100
# A bound only against nonsense; the engine still clamps to the context left.
MAX_TOKENS_LIMIT = 32768


# No vocabulary is larger; a bound keeps absurd values out of the engines.
MAX_TOP_K = 1 << 20


class SamplingError(ValueError):
    """A bad sampling value or an unknown field; ``field`` names it (what an
    HTTP 400 reports as ``param``, what a call's error event can point at)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one reply. Defaults are firstline's for the embedded
    SmolLM2-135M (greedy plus a light repetition penalty, see below); every
    field is validated on construction, so an instance is always usable."""

    # 0 is greedy: the same question gets the same answer (tests, replays),
    # and a 135M model's samples at higher temperature wander off topic.
    temperature: float = 0.0
    # Nucleus sampling (1: off). Irrelevant at temperature 0.
    top_p: float = 1.0
    # Keep only the k most likely tokens (0: off; llama.cpp's own default of
    # 40 is overridden so every engine samples the same way).
    top_k: int = 0
    # Drop tokens below min_p x the top token's probability (0: off).
    min_p: float = 0.0
    # Anti-loop default, measured on the embedded SmolLM2-135M (llama.cpp,
    # greedy, 114 replies: 18 one-turn phone questions + the 24 scripted
    # 4-turn calls of benchmarks/data/calls.json). A reply "loops" if it
    # repeats a 4-word run or a sentence, or copies a 6-word run from an
    # earlier reply of the same call:
    #   no penalty                            43 % loop, 28 tokens/reply
    #   repetition 1.1 over the whole context 10 % loop, 42 tokens, facts 6/6
    #   repetition 1.1 over llama.cpp's last 64 tokens (its default)  35 %
    #   presence 0.3 / 0.6                    46 % / 49 %
    #   frequency 0.3 / 0.6 (66 replies)      no better than none
    #   DRY 0.8 (256-token window)            16 % (copies 6 %, but breaks on
    #                                         "\n": "I'm sorry.\n\nI'm sorry.")
    #   repetition 1.05 + DRY 0.8             8 %, but DRY is llama.cpp-only
    # Most loops are copies of the call's earlier replies, which only a
    # whole-context penalty sees; vLLM applies repetition_penalty that way
    # too, so the one default means the same on every engine. On vLLM (bf16
    # of the same model, same 114 replies): 48 % -> 9 % loop, facts 4/6 ->
    # 6/6. The cost: replies run longer (28 -> 42 tokens, 12 % reach 96);
    # the first sentence, which TTFS waits for, barely moves (mean 10.1 ->
    # 10.2 words on llama.cpp, 10.5 -> 11.0 on vLLM). Temperature stays 0.
    repetition_penalty: float = 1.1
    # OpenAI's penalties, -2..2 (0: off).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # DRY ("don't repeat yourself"), llama.cpp only: penalises extending a
    # sequence that already occurred. 0 multiplier: off.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    # How far back DRY looks, in tokens (0: off). llama.cpp's server refuses
    # its old -1 ("whole context"); 64 is its default.
    dry_penalty_last_n: int = 64
    # Generation ends before any of these strings (not included in the reply).
    stop: tuple[str, ...] = ()
    # Fixed seed for reproducible sampling at temperature > 0 (None: random).
    seed: int | None = None
    max_tokens: int = 96

    def __post_init__(self) -> None:
        # A list (JSON) or a single string (OpenAI allows it) becomes a tuple,
        # so the frozen instance is really immutable and hashable.
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list | tuple):
            stop = tuple(stop)
        else:
            raise SamplingError("stop", f"'stop' must be a string or a list of strings, got {type(stop).__name__}")
        object.__setattr__(self, "stop", stop)
        _number(self, "temperature", 0.0, 2.0)
        _number(self, "top_p", 0.0, 1.0, low_open=True)
        _integer(self, "top_k", 0, None, hint="0 disables")
        if self.top_k > MAX_TOP_K:
            raise SamplingError("top_k", f"'top_k' must be at most {MAX_TOP_K}, got {self.top_k:.3g}")
        _number(self, "min_p", 0.0, 1.0)
        _number(self, "repetition_penalty", 0.0, 2.0, low_open=True, hint="1 disables")
        _number(self, "frequency_penalty", -2.0, 2.0)
        _number(self, "presence_penalty", -2.0, 2.0)
        _number(self, "dry_multiplier", 0.0, 5.0, hint="0 disables")
        _number(self, "dry_base", 1.0, 4.0)
        _integer(self, "dry_allowed_length", 1, 64)
        _integer(self, "dry_penalty_last_n", 0, MAX_TOKENS_LIMIT, hint="0 disables")
        if self.seed is not None:
            _integer(self, "seed", 0, MAX_SEED)
        _integer(self, "max_tokens", 1, MAX_TOKENS_LIMIT)
        if len(stop) > MAX_STOP:
            raise SamplingError("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                message = f"each 'stop' entry must be a string of 1..{MAX_STOP_CHARS} characters, got {shown_value(s)}"
                raise SamplingError("stop", message)

    # -- building ---------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def merged(self, overrides: Mapping[str, Any] | None) -> SamplingParams:
        """A copy with ``overrides`` applied (a per-call or per-request dict,
        e.g. parsed JSON). Unknown keys are an error (a typo must not be
        silently ignored); a ``None`` value leaves that field as it is, the
        way OpenAI clients send ``null`` for "the default"."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise SamplingError("sampling", f"sampling overrides must be an object, got {type(overrides).__name__}")
        known = self.field_names()
        for key in overrides:
            if key not in known:
                name = shown_name(str(key))
                raise SamplingError(name, f"unknown sampling field {name!r}{did_you_mean(str(key), known)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """From :meth:`as_dict` output (configs, JSON); missing keys take the defaults."""
        return cls().merged(data)

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (``stop`` as a list)."""
        data = dataclasses.asdict(self)
        data["stop"] = list(self.stop)
        return data

    # -- engines ----------------------------------------------------------

    def to_llamacpp(self, context_tokens: int) -> dict[str, Any]:
        """Fields for llama.cpp's server API (``xllamacpp``'s
        ``handle_chat_completions``). All of them, every time: llama.cpp's own
        defaults (top_k 40, top_p 0.95, min_p 0.05) differ from ours.

        ``context_tokens`` (a slot's context) is the penalties' look-back:
        llama.cpp's default of 64 tokens sees neither the history nor the
        earlier replies, so a reply copied from the last turn went unpenalised;
        over the whole context, ``repetition_penalty`` means what it means in
        vLLM (every prompt and reply token)."""
        body: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repetition_penalty,
            "repeat_last_n": context_tokens,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "dry_multiplier": self.dry_multiplier,
            "dry_base": self.dry_base,
            "dry_allowed_length": self.dry_allowed_length,
            "dry_penalty_last_n": self.dry_penalty_last_n,
            "stop": list(self.stop),
        }
        if self.seed is not None:  # absent: llama.cpp draws a random seed
            body["seed"] = self.seed
        return body

    def check_vllm(self, speculation: bool = False) -> None:
        """Raise SamplingError for what vLLM cannot honour (``speculation``:
        the engine runs speculative decoding)."""
        if self.dry_multiplier > 0:
            raise SamplingError("dry_multiplier", "vLLM has no DRY sampler: set dry_multiplier to 0 (or use llama.cpp)")
        if speculation and self.min_p > 0:
            # vLLM's own rule (its rejection sampler has no min_p); checked
            # here so the request is refused up front, with the reason.
            raise SamplingError("min_p", "vLLM cannot apply min_p with speculative decoding: set min_p to 0")

    def to_vllm(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.SamplingParams`` (output kind and the
        context clamp of max_tokens are the engine's business)."""
        self.check_vllm()
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            # -1 is "off" in every vLLM (0 only in recent ones).
            "top_k": self.top_k if self.top_k > 0 else -1,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "stop": list(self.stop) or None,
            "seed": self.seed,
        }

    def to_openai(self, full: bool = False) -> dict[str, Any]:
        """Chat-completions body fields. The standard ones always; vLLM's
        extras (top_k, min_p, repetition_penalty) and llama.cpp's DRY fields
        only when they do something, so a strict OpenAI endpoint (which
        refuses unknown fields) works once they are off, i.e. with
        ``repetition_penalty`` 1 instead of the default.

        ``full``: every field, "off" values included, for a server that fills
        a missing field with *its* default (our own llm.openai_server, the
        supervised child): there, leaving a field out would turn a call's
        "off" back into the server's setting."""
        if full:
            body = {k: v for k, v in self.as_dict().items() if k != "seed"}
            if self.seed is not None:
                body["seed"] = self.seed
            return body
        body: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
        }
        if self.stop:
            body["stop"] = list(self.stop)
        if self.seed is not None:
            body["seed"] = self.seed
        if self.top_k > 0:
            body["top_k"] = self.top_k
        if self.min_p > 0:
            body["min_p"] = self.min_p
        if self.repetition_penalty != 1.0:
            body["repetition_penalty"] = self.repetition_penalty
        if self.dry_multiplier > 0:
            body.update(
                dry_multiplier=self.dry_multiplier,
                dry_base=self.dry_base,
                dry_allowed_length=self.dry_allowed_length,
                dry_penalty_last_n=self.dry_penalty_last_n,
            )
        return body

    @classmethod
    def openai_fields(cls) -> frozenset[str]:
        """Body fields :meth:`from_openai` reads."""
        return frozenset(cls.field_names()) | {"max_completion_tokens"}

    def from_openai(self, body: Mapping[str, Any]) -> SamplingParams:
        """``self`` (the server's defaults) with the sampling fields of a
        chat-completions body applied; ValueError on a bad value. Fields
        other than sampling ones are ignored here (the server vets them)."""
        overrides = {k: body[k] for k in self.field_names() if k in body}
        # OpenAI's newer name wins over the deprecated one.
        if body.get("max_completion_tokens") is not None:
            overrides["max_tokens"] = body["max_completion_tokens"]
        return self.merged(overrides)


def sampling_alias(name: str) -> property:
    """A property aliasing ``self.sampling.<name>``: the legacy
    ``max_tokens`` / ``temperature`` attributes of LLMConfig and
    GenerationRequest, which now live in their ``sampling``. Setting one
    replaces ``sampling`` with a validated copy."""

    def get(self: Any) -> Any:
        return getattr(self.sampling, name)

    def set_(self: Any, value: Any) -> None:
        self.sampling = self.sampling.merged({name: value})

    return property(get, set_, doc=f"Alias of ``sampling.{name}``.")


# -- validation helpers -----------------------------------------------------


# No field name is longer; a client's unknown key is cut to this in errors.
MAX_FIELD_NAME_CHARS = 64


def shown_name(key: str) -> str:
    """An unknown field name as an error repeats it: cut, since a client
    chooses it (a megabyte key would come back, and be logged, whole)."""
    return key if len(key) <= MAX_FIELD_NAME_CHARS else key[:MAX_FIELD_NAME_CHARS] + "..."


def did_you_mean(key: str, known: tuple[str, ...] | frozenset[str] | set[str]) -> str:
    """`` (did you mean 'x'?)`` for a misspelt field name, else the known names."""
    # difflib is quadratic in the key's length, on the event loop every
    # call shares: a megabyte key took 0.24 s. Nothing that long is a typo.
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6) if len(key) <= MAX_FIELD_NAME_CHARS else []
    # llama.cpp's names for the same things, which close-match misses.
    aliases = {"repeat_penalty": "repetition_penalty", "n_predict": "max_tokens", "temp": "temperature"}
    hint = aliases.get(key) or (close[0] if close else None)
    return f" (did you mean {hint!r}?)" if hint else f"; known fields: {', '.join(sorted(known))}"


def _range(low: float, high: float | None, low_open: bool) -> str:
    def fmt(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"  # 2.0 -> "2", seeds in full

    if high is None:
        return f">= {fmt(low)}"
    return f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}]"


def _number(obj: SamplingParams, name: str, low: float, high: float, low_open: bool = False, hint: str = "") -> None:
    value = getattr(obj, name)
    where = f"{_range(low, high, low_open)}" + (f" ({hint})" if hint else "")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingError(name, f"'{name}' must be a number {where}, got {shown_value(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows 10**400)
        finite = False
    if not finite or value < low or value > high or (low_open and value == low):
        raise SamplingError(name, f"'{name}' must be {where}, got {value}")
    object.__setattr__(obj, name, float(value))


def _integer(obj: SamplingParams, name: str, low: int, high: int | None, hint: str = "") -> None:
    value = getattr(obj, name)
    where = _range(low, high, False) + (f" ({hint})" if hint else "")
    # JSON has one number type: 40.0 is accepted as 40, 40.5 is not.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(name, f"'{name}' must be an integer {where}, got {shown_value(value)}")
    if value < low or (high is not None and value > high):
        raise SamplingError(name, f"'{name}' must be an integer {where}, got {value}")
    object.__setattr__(obj, name, value)


# -- command-line flags -----------------------------------------------------

# field -> (type, help), the flag being the field with dashes; one definition
# for `firstline serve` and `python -m llm.openai_server`.
_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("temperature", float, "0: greedy"),
    ("top_p", float, "nucleus sampling, (0, 1]"),
    ("top_k", int, "0: off"),
    ("min_p", float, "0: off"),
    ("repetition_penalty", float, "over the whole prompt and reply; 1: off"),
    ("frequency_penalty", float, "-2..2, 0: off"),
    ("presence_penalty", float, "-2..2, 0: off"),
    ("dry_multiplier", float, "DRY anti-repetition, llama.cpp only; 0: off"),
    ("dry_base", float, "DRY penalty growth"),
    ("dry_allowed_length", int, "DRY: repeats up to this long are free"),
    ("dry_penalty_last_n", int, "DRY window in tokens (0: off)"),
    ("seed", int, "fixed sampling seed (default: random)"),
)


def add_sampling_arguments(parser: argparse.ArgumentParser | Any, prefix: str = "") -> None:
    """Add ``--{prefix}temperature``, ``--{prefix}top-p``, ... (each default
    None: unset flags keep :class:`SamplingParams`' defaults)."""
    group = parser.add_argument_group("sampling (defaults for every reply; a request or call may override them)")
    defaults = SamplingParams()
    for field, kind, help_text in _FLAGS:
        default = getattr(defaults, field)
        group.add_argument(
            f"--{prefix}{field.replace('_', '-')}",
            dest=f"sampling_{field}",
            type=kind,
            default=None,
            metavar="N" if kind is int else "X",
            help=help_text if default is None else f"{help_text} (default {default:g})",
        )
    group.add_argument(
        f"--{prefix}stop",
        dest="sampling_stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="end the reply before this string; repeatable",
    )


def sampling_from_args(args: argparse.Namespace, base: SamplingParams | None = None, **extra: Any) -> SamplingParams:
    """``base`` (default: :class:`SamplingParams`'s defaults) with the flags
    added by :func:`add_sampling_arguments` and ``extra`` (e.g. max_tokens)
    applied; a bad value raises ValueError naming the field."""
    overrides = {field: getattr(args, f"sampling_{field}", None) for field, _, _ in _FLAGS}
    overrides["stop"] = getattr(args, "sampling_stop", None)
    overrides.update(extra)
    return (base or SamplingParams()).merged(overrides)
