"""What the model is answered with: the call's instructions and its
conversation so far. The session alone writes it (turns hand back their
outcome; transports report what the caller heard), so the model never
believes it said words the caller did not hear.
"""

from __future__ import annotations

import contextlib

# Instructions plus system context items (Realtime): a bound on the prompt a
# client can build up, well inside the models' context.
MAX_INSTRUCTIONS = 32 * 1024

Message = dict[str, str]


def keep_heard(history: list[Message], replies: dict[int, Message], turn: int, heard: str) -> None:
    """Cut ``turn``'s assistant message in ``history`` to what the caller
    heard; drop it when they heard nothing (``replies``: turn -> message)."""
    message = replies.get(turn)
    if message is None:
        return
    if heard.strip():
        message["content"] = heard.strip()
    else:
        with contextlib.suppress(ValueError):
            history.remove(message)
        del replies[turn]


class History:
    """Instructions, then user/assistant messages, trimmed to the last
    ``max_turns`` exchanges so a long call cannot grow memory or prompt."""

    def __init__(self, system_prompt: str, max_turns: int) -> None:
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.messages_so_far: list[Message] = []
        self.replies: dict[int, Message] = {}  # turn -> its assistant message

    def __len__(self) -> int:
        return len(self.messages_so_far)

    def messages(self, user_text: str) -> list[Message]:
        """The prompt that answers ``user_text`` now."""
        return [
            {"role": "system", "content": self.system_prompt},
            *self.messages_so_far,
            {"role": "user", "content": user_text},
        ]

    def remember(self, turn: int, user_text: str, reply: str) -> None:
        self.messages_so_far.append({"role": "user", "content": user_text})
        if reply:
            message = {"role": "assistant", "content": reply}
            self.messages_so_far.append(message)
            self.replies[turn] = message
        self._trim()

    def heard(self, turn: int, heard: str) -> None:
        """The caller heard only ``heard`` of ``turn``'s reply."""
        keep_heard(self.messages_so_far, self.replies, turn, heard)

    def add(self, role: str, text: str) -> None:
        """A text message a client adds (Realtime ``conversation.item.create``):
        system text extends the instructions, user/assistant text joins the
        conversation the next turn is answered in."""
        if role == "system":
            prompt = f"{self.system_prompt}\n\n{text}"
            if len(prompt) > MAX_INSTRUCTIONS:
                raise ValueError(f"instructions would exceed {MAX_INSTRUCTIONS} characters")
            self.system_prompt = prompt
        else:
            self.messages_so_far.append({"role": role, "content": text})
            self._trim()  # a client adding items in a loop cannot grow memory

    def _trim(self) -> None:
        keep = 2 * self.max_turns
        if len(self.messages_so_far) > keep:
            del self.messages_so_far[:-keep]
            kept = {id(m) for m in self.messages_so_far}
            self.replies = {t: m for t, m in self.replies.items() if id(m) in kept}
