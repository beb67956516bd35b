"""Does a prompt built to the call's token budget fit a real engine's context?
Shared by the per-engine tests (llama.cpp in process and as the supervised
child, vLLM in process, `vllm serve` behind RemoteEngine)."""

from __future__ import annotations

from llm.base import GenerationRequest, LLMEngine
from voice.call.history import MIN_TURN_TOKENS, PER_MESSAGE_TOKENS, History, estimate_tokens
from voice.call.session import INITIAL_TOKEN_SCALE, PROMPT_MARGIN_TOKENS

# Real, varied conversation text (phone-agent style), repeated to make a long call.
EXCHANGES = [
    ("Hi, I'd like to check on my order from last Tuesday.", "Sure, can you give me the order number?"),
    ("It's four four seven one, under the name Ada Lovelace.", "Thanks Ada, I see it here. It shipped yesterday."),
    ("When will it arrive at my office in Cambridge?", "It should arrive on Thursday before noon."),
    ("Can I change the delivery address to my home instead?", "Yes, I can do that. What is the new address?"),
]
# Text the byte estimate used to undercount on SmolLM2 (a Spanish call ran
# 1.14x over it, digits 1.9x, Chinese 1.6x, Hindi 1.25x): each language
# must fit at the session's starting budget.
OTHER_LANGUAGES = {
    "spanish": [
        (
            "Sí, mire, necesito cambiar la dirección de entrega de mi pedido, el número es 4512 8839.",
            "Claro. He cambiado la dirección y el pedido llegará el viernes por la mañana, ¿algo más?",
        )
    ],
    "digits": [("My card is 5500 0000 1111 2222, expiry 09 27, code 731.", "Thanks. Card ending 2222, 09/27.")],
    "chinese": [("你好，我想改一下我订单的送货地址，星期五上午能送到吗？", "可以。地址已经改好了，星期五上午送到。")],
    "hindi": [("नमस्ते, मैं अपने ऑर्डर का डिलीवरी पता बदलना चाहता हूँ।", "ज़रूर। नया पता बताइए, मैं अभी बदल देता हूँ।")],
}


def largest_instructions(budget_tokens: int) -> str:
    """The longest system prompt the call accepts for this budget."""
    sentence = "You are a careful phone agent for Acme; confirm details before you act. "
    allowed = budget_tokens - MIN_TURN_TOKENS - PER_MESSAGE_TOKENS
    text = sentence * (allowed * 3 // len(sentence) + 1)
    while estimate_tokens(text) > allowed:
        text = text[:-1]
    return text


async def assert_other_languages_fit(engine: LLMEngine, context_tokens: int, reply_tokens: int = 1400) -> None:
    """A long call in each of OTHER_LANGUAGES, trimmed to the budget a call
    starts with (before its engine reported any prompt): the engine's own
    count leaves room for the reply."""
    budget = int((context_tokens - reply_tokens - PROMPT_MARGIN_TOKENS) / INITIAL_TOKEN_SCALE)
    for language, exchanges in OTHER_LANGUAGES.items():
        history = History("You are a phone agent.", max_turns=40)
        for turn in range(40):
            history.remember(turn, *exchanges[turn % len(exchanges)])
        request = GenerationRequest(f"budget-{language}", history.messages("?", None, budget), max_tokens=4)
        [d async for d in engine.stream(request)]
        room = context_tokens - reply_tokens - PROMPT_MARGIN_TOKENS
        assert 0 < request.usage.prompt_tokens <= room, (language, request.usage.prompt_tokens, room)


async def assert_budgeted_prompt_fits(engine: LLMEngine, context_tokens: int, reply_tokens: int = 1400) -> None:
    """A call at its limits: the largest instructions the budget admits and a
    40-turn history. The prompt the session builds must be served, and the
    engine's own count must leave room for a reply of ``reply_tokens`` (the
    call's max_tokens). A large reserve keeps the prompt short: a cold
    prefill runs at ~100-300 tokens/s on 2 cores, and a test must not wait
    on that. Only a few tokens are generated."""
    max_tokens = 16
    budget = context_tokens - reply_tokens - PROMPT_MARGIN_TOKENS
    instructions = largest_instructions(budget)
    history = History(instructions, max_turns=40)
    history.check_instructions(instructions, budget)  # accepted
    for turn in range(40):
        user, agent = EXCHANGES[turn % len(EXCHANGES)]
        history.remember(turn, user, agent)
    messages = history.messages("And can you email me the receipt?", None, budget)
    request = GenerationRequest("budget", messages, max_tokens=max_tokens)
    text = "".join([d async for d in engine.stream(request)])
    assert text.strip(), "no reply to a prompt at the budget"
    assert 0 < request.usage.prompt_tokens <= budget, (request.usage.prompt_tokens, budget)

    # With a shorter prompt the same history comes back in: trimming is by tokens.
    history.system_prompt = "You are a phone agent."
    roomy = history.messages("And can you email me the receipt?", None, budget)
    assert len(roomy) > len(messages)
    request = GenerationRequest("budget-roomy", roomy, max_tokens=max_tokens)
    assert "".join([d async for d in engine.stream(request)]).strip()
    assert request.usage.prompt_tokens <= budget, (request.usage.prompt_tokens, budget)
