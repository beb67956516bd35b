"""What the model is answered with: the call's instructions and its
conversation so far. The session alone writes it (turns hand back their
outcome; transports report what the caller heard), so the model never
believes it said words the caller did not hear.
"""

from __future__ import annotations

import re

# Instructions plus system context items (Realtime): a bound on the prompt a
# client can build up, well inside the models' context.
MAX_INSTRUCTIONS = 32 * 1024

Message = dict[str, str]
# Room a prompt keeps for the caller's new words beyond the instructions.
MIN_TURN_TOKENS = 64
# Chat-template tokens around each message (role markers, separators).
PER_MESSAGE_TOKENS = 4
# A reply nobody spoke for (a greeting, Realtime response.create) whose
# prompt would end on the agent's own words: chat engines read a trailing
# assistant message as text to continue (llama.cpp: the greeting came out
# as the rest of the last example answer; two in a row: HTTP 500), so the
# prompt ends on one of these instead. Not kept in the history.
OPENING_CUE = "(The call has just connected. Greet the caller.)"
GO_ON_CUE = "(The caller is quiet. Go on.)"


_DIGITS = tuple(b"0123456789")


# Chat-template control strings (ChatML / Llama 3 / Phi "<|...|>", Gemma's
# turn markers, Llama 2 / Mistral "[INST]", "<<SYS>>", "</s>"): in a caller's
# or client's words the engines' tokenizers read them as the real tokens, so
# typed text could open a system turn of its own. Taken out of every message
# but the instructions (the operator's).
_TEMPLATE_TOKENS = re.compile(
    r"<\|[A-Za-z0-9_.:/ -]{1,48}\|>|<(?:start|end)_of_turn>|\[/?INST\]|<</?SYS>>|</?s>", re.IGNORECASE
)


def without_template_tokens(text: str) -> str:
    return _TEMPLATE_TOKENS.sub(" ", text) if "<" in text or "[" in text else text


def estimate_tokens(text: str) -> int:
    """A deliberately high token count for ``text``, without a tokenizer: BPE
    vocabularies of chat models average 4+ bytes of English per token, and 3
    leaves a margin; but many split numbers digit by digit (an account
    number read out: 2 real tokens per byte-third, SmolLM2), and text in
    other scripts costs 0.4-0.6 tokens a byte (Hindi, Chinese). So a digit
    counts as a token, a byte outside ASCII as three quarters of one. Latin
    languages other than English still run over (Spanish ~1.2x on SmolLM2):
    the session scales its budget by what the engine reports
    (``CallSession.token_scale``). Engines that tokenize in-process (vLLM)
    also trim exactly, as a last resort."""
    raw = text.encode("utf-8")
    digits = sum(raw.count(d) for d in _DIGITS)
    other_scripts = len(raw) - len(text.encode("ascii", "ignore"))
    return (len(raw) - digits - other_scripts) // 3 + digits + other_scripts * 3 // 4 + 1


def newest_within(text: str, tokens: int) -> str:
    """The newest words of ``text`` that estimate_tokens counts as at most
    ``tokens`` (each word with its space: a little over the whole's count)."""
    words = text.split()
    used, start = 0, len(words)
    while start > 0 and used + (cost := estimate_tokens(words[start - 1] + " ")) <= tokens:
        used += cost
        start -= 1
    return " ".join(words[start:])


def prompt_tokens(messages: list[Message]) -> int:
    return sum(estimate_tokens(m["content"]) + PER_MESSAGE_TOKENS for m in messages)


# The most one cue costs a prompt: the budget keeps room for the ones
# alternating() adds (merging the caller's messages only saves tokens).
CUE_TOKENS = max(prompt_tokens([{"role": "user", "content": cue}]) for cue in (OPENING_CUE, GO_ON_CUE))


def remove_this(history: list[Message], message: Message) -> None:
    """Take ``message`` itself out of ``history``: not list.remove, which
    takes the first message *equal* to it, another turn's "Yes." or an
    earlier fallback reply the caller did hear."""
    for i, kept in enumerate(history):
        if kept is message:
            del history[i]
            return


def keep_heard(history: list[Message], replies: dict[int, Message], turn: int, heard: str) -> None:
    """Cut ``turn``'s assistant message in ``history`` to what the caller
    heard; drop it when they heard nothing (``replies``: turn -> message)."""
    message = replies.get(turn)
    if message is None:
        return
    if heard.strip():
        message["content"] = heard.strip()
    else:
        remove_this(history, message)
        del replies[turn]


def alternating(messages: list[Message], from_start: bool) -> list[Message]:
    """The conversation with caller and agent taking turns, as chat templates
    that insist on it (Gemma, Mistral, Llama 2 on llama.cpp or vLLM) and
    llama.cpp's trailing-assistant rule need. The history may hold the
    agent twice in a row (a greeting, two Realtime response.create) or the
    caller twice (a reply nobody heard, a failed turn, a text item then
    speech): the agent's lines get the cue they were generated after
    between them (OPENING_CUE before a call's first line, GO_ON_CUE after
    that), and the caller's words run together as one message. New dicts:
    the history itself is not changed."""
    out: list[Message] = []
    for message in messages:
        role = message["role"]
        if out and role == "user" == out[-1]["role"]:
            out[-1] = {"role": "user", "content": f"{out[-1]['content']} {message['content']}"}
            continue
        if role == "assistant" and (not out or out[-1]["role"] == "assistant"):
            cue = OPENING_CUE if not out and from_start else GO_ON_CUE
            out.append({"role": "user", "content": cue})
        out.append(dict(message))
    return out


def fitted_costs(messages: list[Message]) -> list[int]:
    """Each message's tokens in a prompt, with the cue :func:`alternating`
    puts before an agent line that has no caller line before it."""
    costs, previous = [], None
    for message in messages:
        cue = CUE_TOKENS if message["role"] == "assistant" and previous != "user" else 0
        costs.append(prompt_tokens([message]) + cue)
        previous = message["role"]
    return costs


class ContextTooLarge(ValueError):
    """Instructions or context that cannot fit the model's context window."""

    code = "context_too_large"


class History:
    """Instructions, then user/assistant messages, trimmed to the last
    ``max_turns`` exchanges so a long call cannot grow memory or prompt."""

    def __init__(self, system_prompt: str, max_turns: int, examples: list[Message] | None = None) -> None:
        # The prompt is the instructions, then the system text a client
        # added (Realtime system items): new instructions (session.update,
        # start, a re-attach) replace the first and keep the second, as
        # OpenAI's API does.
        self.instructions = system_prompt
        self.system_items: list[str] = []
        self.max_turns = max_turns
        # Example turns (LLMConfig.example_turns) follow the server's own
        # prompt, or one that extends it (Realtime system items); a call
        # that replaces the prompt owns it whole: no words of ours in its
        # model's mouth.
        self._server_prompt = system_prompt
        self._examples = list(examples or [])
        self.messages_so_far: list[Message] = []
        # The oldest messages were dropped (max_turns): the first one kept is
        # not the call's first, and an agent line there is no greeting.
        self._trimmed = False
        self.replies: dict[int, Message] = {}  # turn -> its assistant message
        self.asked: dict[int, Message] = {}  # turn -> its user message
        # The oldest message prompts still include (None: from the start).
        self._first_kept: Message | None = None

    def __len__(self) -> int:
        return len(self.messages_so_far)

    @property
    def system_prompt(self) -> str:
        return self.prompt_with(self.instructions)

    @system_prompt.setter
    def system_prompt(self, instructions: str) -> None:
        self.instructions = instructions

    def prompt_with(self, instructions: str) -> str:
        """The system prompt these instructions would make (items kept)."""
        return "\n\n".join([instructions, *self.system_items])

    def set_instructions(self, instructions: str, budget_tokens: int | None) -> None:
        """New instructions (the client's system items stay); raises
        ContextTooLarge when the prompt they make is too long."""
        self.check_prompt(self.prompt_with(instructions), budget_tokens)
        self.instructions = instructions

    def check_prompt(self, prompt: str, budget_tokens: int | None) -> None:
        """Within MAX_INSTRUCTIONS characters and leaving room for a turn."""
        if len(prompt) > MAX_INSTRUCTIONS:
            raise ContextTooLarge(f"instructions would exceed {MAX_INSTRUCTIONS} characters")
        self.check_instructions(prompt, budget_tokens)

    def messages(
        self, user_text: str | None, instructions: str | None = None, budget_tokens: int | None = None
    ) -> list[Message]:
        """The prompt that answers ``user_text`` now (None: the conversation
        as it stands), with ``instructions`` added for this reply only; the
        oldest history is left out until it fits ``budget_tokens``."""
        system = self.system_prompt if not instructions else f"{self.system_prompt}\n\n{instructions}"
        past = list(self.messages_so_far)
        answering = user_text
        if user_text is None and past and past[-1]["role"] == "user":
            # The conversation ends with the caller's words (a text item):
            # they are what this reply answers, trimmed like a turn's words
            # if they overflow, never left out whole with the oldest history
            # (the model got the system prompt alone).
            answering = past.pop()["content"]
        new = [] if answering is None else [{"role": "user", "content": answering}]
        if answering is None:
            new = [{"role": "user", "content": GO_ON_CUE if past else OPENING_CUE}]
        head = [{"role": "system", "content": system}, *self.examples()]
        if budget_tokens is not None:
            room = budget_tokens - prompt_tokens(head)
            new_tokens = prompt_tokens(new)
            if answering is not None and new_tokens > room:
                # The caller's words alone overflow what the instructions
                # leave (long instructions, a long turn): their newest words,
                # or every retry of the turn would fail the same way.
                new = [{"role": "user", "content": newest_within(answering, room - PER_MESSAGE_TOKENS)}]
                new_tokens = prompt_tokens(new)
            # One cue's room beyond the messages' own: the oldest kept line
            # may be the agent's with its caller line trimmed away.
            spare = room - new_tokens - CUE_TOKENS
            past = self._fit(past, spare, answering is not None)
        from_start = bool(past) and past[0] is self.messages_so_far[0] and not self._trimmed
        said = [{**m, "content": without_template_tokens(m["content"])} for m in alternating([*past, *new], from_start)]
        return [*head, *said]

    def examples(self) -> list[Message]:
        """The example turns this call's prompts carry (none once the call
        replaced the server's prompt)."""
        return self._examples_with(self.system_prompt)

    def _examples_with(self, prompt: str) -> list[Message]:
        return self._examples if prompt.startswith(self._server_prompt) else []

    def _fit(self, past: list[Message], spare: int, caller_next: bool) -> list[Message]:
        """The newest history that fits ``spare`` tokens. Once it overflows,
        the oldest messages go in one step down to half the spare room, and
        that starting point holds for the next turns: every prompt until the
        next overflow then shares its prefix, which the engine's prefix cache
        serves (trimming one message per turn would shift the prefix each
        turn and re-prefill the whole history: seconds on a CPU)."""
        start = next((i for i, m in enumerate(past) if m is self._first_kept), 0)
        costs = fitted_costs(past)
        used = sum(costs[start:])
        if used > spare:
            low_water = spare // 2
            while start < len(past) and used > low_water:
                used -= costs[start]
                start += 1
            # A prompt's history starts with the caller's words.
            while caller_next and start < len(past) and past[start]["role"] == "assistant":
                start += 1
            self._first_kept = past[start] if start < len(past) else None
        return past[start:]

    def check_instructions(self, prompt: str, budget_tokens: int | None) -> None:
        """Refuse instructions that leave no room for a turn in the model's
        context: a clear error at start, not a failed turn later."""
        if budget_tokens is None:
            return
        need = (
            estimate_tokens(prompt) + PER_MESSAGE_TOKENS + MIN_TURN_TOKENS + prompt_tokens(self._examples_with(prompt))
        )
        if need > budget_tokens:
            raise ContextTooLarge(
                f"instructions of about {need - MIN_TURN_TOKENS} tokens leave no room for the conversation "
                f"in the model's context ({budget_tokens} tokens for the prompt); shorten them"
            )

    def last_reply(self) -> str:
        """The newest assistant message: what the caller last heard."""
        for message in reversed(self.messages_so_far):
            if message["role"] == "assistant":
                return message["content"]
        return ""

    def remember(self, turn: int, user_text: str, reply: str) -> None:
        if user_text:  # a greeting or a reply to text context has no new user words
            asked = {"role": "user", "content": user_text}
            self.messages_so_far.append(asked)
            self.asked[turn] = asked
        if reply:
            message = {"role": "assistant", "content": reply}
            self.messages_so_far.append(message)
            self.replies[turn] = message
        self._trim()

    def restore(self, messages: list[Message]) -> None:
        """The conversation of a call that re-attached (voice/call/store.py).
        Its turns' replies can no longer be cut to what was heard."""
        self.messages_so_far = list(messages)
        self._trimmed = len(messages) >= 2 * self.max_turns  # as full as trimming leaves it: it may have been
        self.replies = {}
        self.asked = {}
        self._first_kept = None
        self._trim()

    def retract(self, turn: int) -> bool:
        """Take ``turn`` back out of the conversation: the caller resumed
        right after its reply began, so its words go on into the next turn
        and the reply (premature) was never an answer. False when the
        conversation did not hold the turn's words."""
        asked = self.asked.pop(turn, None)
        for message in (asked, self.replies.pop(turn, None)):
            if message is not None:
                remove_this(self.messages_so_far, message)
        return asked is not None

    def heard(self, turn: int, heard: str) -> None:
        """The caller heard only ``heard`` of ``turn``'s reply."""
        keep_heard(self.messages_so_far, self.replies, turn, heard)

    def as_heard(self, heard: dict[int, str]) -> list[Message]:
        """The conversation as the caller has heard it so far: each turn in
        ``heard`` (a reply still going out) cut to its words. Copies: the
        history itself keeps every word sent until the call says otherwise."""
        messages = [dict(m) for m in self.messages_so_far]
        if heard:
            at = {id(m): i for i, m in enumerate(self.messages_so_far)}
            replies = {t: messages[at[id(m)]] for t, m in self.replies.items() if id(m) in at}
            for turn, words in heard.items():
                keep_heard(messages, replies, turn, words)
        return messages

    def add(self, role: str, text: str, budget_tokens: int | None = None, instructions: str | None = None) -> None:
        """A text message a client adds (Realtime ``conversation.item.create``):
        system text extends the instructions, user/assistant text joins the
        conversation the next turn is answered in. ``instructions``: the
        ones the call will start with, where they are not these yet (a
        Realtime session before its first audio)."""
        if role == "system":
            self.check_prompt(f"{self.prompt_with(instructions or self.instructions)}\n\n{text}", budget_tokens)
            self.system_items.append(text)
        else:
            self.messages_so_far.append({"role": role, "content": text})
            self._trim()  # a client adding items in a loop cannot grow memory

    def _trim(self) -> None:
        keep = 2 * self.max_turns
        if len(self.messages_so_far) > keep:
            del self.messages_so_far[:-keep]
            self._trimmed = True
            kept = {id(m) for m in self.messages_so_far}
            self.replies = {t: m for t, m in self.replies.items() if id(m) in kept}
            self.asked = {t: m for t, m in self.asked.items() if id(m) in kept}
