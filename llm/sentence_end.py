"""P(the caller's sentence ends here), from the loaded LLM: an end-of-turn input.

At a pause the caller's words so far go into the chat template as the last
user message, left open (no end-of-message token), and the model is asked
for one next token. Its probability mass on a full stop, question mark,
exclamation mark or its end-of-message token is how sure it is the
sentence is over: "my phone number is" puts almost none there, "where is
my order" a good share. An untuned small model rarely ends a user message
outright, which is why the punctuation counts too (measured by
benchmarks/end_of_turn.py: its end-of-message token alone almost never
fired).

Whisper ends every fragment with a period; that period would tell the model
the sentence is over, exactly what is not known, so it is taken off first.

The prompt is the same prefix as the turn's own reply prompt up to the
caller's last word, so on engines with prefix caching (llama.cpp slots,
vLLM APC) the probe's prefill is reused by the preemptive generation that
follows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Tokens that end a sentence ("..." trails off and "," goes on: neither counts).
SENTENCE_ENDS = frozenset({".", "?", "!"})
# How many candidates for the next token the engine reports: the mass the
# measure needs sits in the first few; a token outside them counts as 0.
TOP_TOKENS = 20
# Marks where the caller's words stop in the rendered template: every
# template wraps a message in its own tokens, and this cut leaves it open.
_OPEN = "\u2063firstline-open-message\u2063"


def unpunctuated(text: str) -> str:
    """The caller's words without Whisper's final punctuation."""
    return text.strip().rstrip(".,…?!").strip()


def open_prompt(
    render: Callable[[list[dict[str, str]]], str], messages: list[dict[str, str]], strip: bool = True
) -> str:
    """``render`` (a chat template, no generation prompt) applied to
    ``messages``, cut right after the last (user) message's words (their
    final punctuation taken off, unless ``strip`` is False)."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("the last message must be the caller's (role user)")
    content = messages[-1]["content"]
    words = unpunctuated(content) if strip else content.strip()
    text = render([*messages[:-1], {"role": "user", "content": words + _OPEN}])
    at = text.find(_OPEN)
    if at < 0:
        raise ValueError("the chat template dropped the caller's message")
    return text[:at]


def message_end_text(render: Callable[[list[dict[str, str]]], str]) -> str:
    """What the template writes right after a user message's words (its
    end-of-message token first: "<|im_end|>\n", "<|eot_id|>"...)."""
    text = render([{"role": "user", "content": _OPEN}])
    return text[text.find(_OPEN) + len(_OPEN) :]


def sentence_end_mass(top: Iterable[tuple[str, int | None, float]], end_ids: frozenset[int]) -> float:
    """Sum of P over ``top`` (token text, token id, logprob) entries that
    end a sentence or the message."""
    total = 0.0
    for token, token_id, logprob in top:
        if (token_id is not None and token_id in end_ids) or token.strip() in SENTENCE_ENDS:
            total += math.exp(logprob)
    return min(1.0, total)


class GGUFChatTemplate:
    """The chat template a GGUF carries, rendered with Jinja as llama.cpp
    and transformers do (sandboxed: the template comes with the model)."""

    def __init__(self, path: Path) -> None:
        import gguf
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        reader = gguf.GGUFReader(str(path))
        template = _field_text(reader, "tokenizer.chat_template")
        if not template:
            raise ValueError(f"{path.name} carries no chat template")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = [bytes(tokens.parts[i]).decode("utf-8", "replace") for i in tokens.data] if tokens else []
        ids = {
            int(reader.fields[key].parts[-1][0])
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if key in reader.fields
        }
        bos = reader.fields.get("tokenizer.ggml.bos_token_id")
        self.end_ids = frozenset(ids)
        self._bos = vocab[int(bos.parts[-1][0])] if bos is not None and vocab else ""
        self._eos = vocab[min(ids)] if ids and vocab else ""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template)

    def render(self, messages: list[dict[str, str]]) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=False, bos_token=self._bos, eos_token=self._eos
        )


def _field_text(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _raise(message: str) -> None:
    raise ValueError(message)
