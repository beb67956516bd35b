"""The LLM's P(the caller's sentence ends here) (llm/sentence_end.py): the
prompt cut open after the caller's words, and the embedded model's answer
on phrases that go on and ones that are over."""

from __future__ import annotations

import math

import pytest

from llm.base import EngineError
from llm.config import LLMConfig
from llm.llamacpp_engine import LlamaCppEngine, resolve_gguf
from llm.sentence_end import GGUFChatTemplate, open_prompt, sentence_end_mass


@pytest.fixture(scope="module")
def template() -> GGUFChatTemplate:
    config = LLMConfig()
    return GGUFChatTemplate(resolve_gguf(config.model, config.embedded_quant))


def test_the_prompt_stops_after_the_callers_words(template: GGUFChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "My number is."},
    ]
    prompt = open_prompt(template.render, messages)
    # Whisper's period is gone and nothing closes the message; the history before is whole.
    assert prompt.endswith("user\nMy number is")
    assert prompt.startswith(template.render(messages[:3]))
    assert open_prompt(template.render, messages, strip=False).endswith("My number is.")
    with pytest.raises(ValueError, match="caller's"):
        open_prompt(template.render, messages[:3])


def test_mass_counts_sentence_ends_and_end_of_message() -> None:
    top = [(".", 13, -1.0), ("?", 47, -2.0), (",", 28, -0.5), ("", 2, -3.0), (" and", 300, -1.5)]
    assert sentence_end_mass(top, frozenset({2})) == pytest.approx(math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert sentence_end_mass([], frozenset({2})) == 0.0


async def test_embedded_model_knows_a_sentence_that_goes_on() -> None:
    engine = LlamaCppEngine(LLMConfig(isolation="inprocess", parallel=1))
    await engine.start()
    try:
        system = {"role": "system", "content": LLMConfig().system_prompt}

        async def p(words: str) -> float:
            return await engine.sentence_end_probability([system, {"role": "user", "content": words}])

        going_on = [await p(w) for w in ("My phone number is.", "I'd like to book an", "I'm calling because")]
        over = [await p(w) for w in ("Where is my order?", "I think I need to reset my password.")]
        assert max(going_on) < 0.05, going_on
        assert min(over) > 0.2, over
        # In the voice process a probe is bounded as a reply's first token is
        # (build_engine sets stream_limits): one the engine cannot answer in
        # time fails with an engine error, and the engine goes on answering.
        engine.stream_limits = (1e-4, 1e-4)
        with pytest.raises(EngineError, match="no answer within"):
            await p("Where is my order?")
        engine.stream_limits = None
        assert await p("Where is my order?") == pytest.approx(over[0], abs=1e-3)
    finally:
        await engine.close()
