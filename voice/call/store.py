"""Where a call's conversation lives between turns, so that a call that
loses its replica (kill -9, a drain that ran out of time, a dropped
websocket) picks up where it was on another one (docs/scaling.md).

What is kept is what the next reply depends on: the instructions, the
history the model is answered with, words carried over to the next turn,
and the turn counter. The session writes it after every turn and reads it
once, at ``start``, when the call re-attaches under the same key: a
carrier's own call id (Twilio's ``callSid``) or the resume token the native
``ready`` event handed out.

:class:`MemoryStore` (the default) survives a reconnect to the same
process; :class:`RedisStore` (``--state-url redis://…``) is shared by every
replica. Entries expire ``ttl_s`` after their last write. Transcripts are
caller data: Redis holds them for that long, and nothing here logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

KEY_PREFIX = "firstline:call:"
# A stored state larger than this is refused (a history is bounded by
# history_turns and MAX_INSTRUCTIONS; this is a second fence).
MAX_STATE_BYTES = 256 * 1024
# One box, MemoryStore: what it holds at once, least recently written out
# first (every call is kept for ttl_s after its last turn, so a stream of
# calls with long instructions must not grow the process without bound).
MAX_MEMORY_CALLS = 10_000
MAX_MEMORY_BYTES = 64 * 1024 * 1024
# A call's state is written at most this often: a client adding Realtime
# text items in a loop would otherwise have every message serialize and
# write the whole conversation (100+ KB) on the shared event loop.
MIN_WRITE_INTERVAL_S = 0.25
# The most a call start waits for its stored conversation: a new connection
# is several round trips (HELLO, CLIENT SETINFO…, GET), each bounded only by
# the socket timeout; a slow store costs the call its past, not seconds of
# silence before ready.
LOAD_TIMEOUT_S = 0.5
STORE_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass
class CallState:
    system_prompt: str
    messages: list[dict[str, str]] = field(default_factory=list)
    carry_over: str = ""
    turn: int = 0

    def to_json(self) -> str:
        # Not ASCII-escaped: an emoji is 4 bytes, not a 12-character escape.
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> CallState | None:
        """None for anything that is not a state this version wrote."""
        try:
            data = json.loads(text)
            messages = [
                {"role": str(m["role"]), "content": str(m["content"])}
                for m in data["messages"]
                if m.get("role") in ("user", "assistant", "system")
            ]
            return cls(str(data["system_prompt"]), messages, str(data.get("carry_over", "")), int(data["turn"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class StoreError(RuntimeError):
    """The store could not be reached or answered nonsense."""


def encode_state(state: CallState) -> str:
    """The stored form, refused (StoreError) over MAX_STATE_BYTES in every store."""
    text = state.to_json()
    size = len(text.encode("utf-8"))
    if size > MAX_STATE_BYTES:
        raise StoreError(f"call state of {size} bytes is over {MAX_STATE_BYTES}")
    return text


class CallStore(Protocol):
    async def load(self, key: str) -> CallState | None: ...

    async def save(self, key: str, state: CallState) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


class MemoryStore:
    def __init__(
        self, ttl_s: float = 3600.0, max_calls: int = MAX_MEMORY_CALLS, max_bytes: int = MAX_MEMORY_BYTES
    ) -> None:
        self.ttl_s = ttl_s
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.bytes = 0
        self._states: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def load(self, key: str) -> CallState | None:
        entry = self._states.get(key)
        if entry is None or entry[0] < time.monotonic():
            self._drop(key)
            return None
        return CallState.from_json(entry[1])

    async def save(self, key: str, state: CallState) -> None:
        text = encode_state(state)
        self._drop(key)
        self._states[key] = (time.monotonic() + self.ttl_s, text)
        self.bytes += len(text.encode("utf-8"))
        while len(self._states) > self.max_calls or self.bytes > self.max_bytes:
            _, (_, old) = self._states.popitem(last=False)
            self.bytes -= len(old.encode("utf-8"))

    async def delete(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._states.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry[1].encode("utf-8"))

    async def close(self) -> None:
        self._states.clear()
        self.bytes = 0

    def describe(self) -> str:
        return "memory"


class RedisStore:
    """One JSON string per call under ``firstline:call:<key>``, with an expiry."""

    def __init__(
        self, url: str, ttl_s: float = 3600.0, timeout_s: float = 1.0, load_timeout_s: float = LOAD_TIMEOUT_S
    ) -> None:
        try:
            import redis.asyncio as redis
        except ImportError as exc:  # pragma: no cover - the scale extra brings it
            raise StoreError("--state-url redis://… needs the redis package (pip install -e '.[scale]')") from exc
        self.url = url
        self.ttl_s = ttl_s
        self.load_timeout_s = load_timeout_s
        self._redis: Any = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)

    async def check(self) -> None:
        """At start-up: a wrong URL is a clear error, not a silent loss of every call's state."""
        try:
            await self._redis.ping()
        except self._errors as exc:
            raise StoreError(f"cannot reach the call state store {self.describe()}: {exc}") from exc

    async def load(self, key: str) -> CallState | None:
        try:
            async with asyncio.timeout(self.load_timeout_s):
                raw = await self._redis.get(KEY_PREFIX + key)
        except TimeoutError:
            raise StoreError(f"call state store {self.describe()}: no answer in {self.load_timeout_s} s") from None
        except self._errors as exc:
            raise StoreError(f"call state store {self.describe()}: {exc}") from exc
        return None if raw is None else CallState.from_json(raw)

    async def save(self, key: str, state: CallState) -> None:
        text = encode_state(state)
        try:
            await self._redis.set(KEY_PREFIX + key, text, ex=max(1, int(self.ttl_s)))
        except self._errors as exc:
            raise StoreError(f"call state store {self.describe()}: {exc}") from exc

    async def delete(self, key: str) -> None:
        try:
            async with asyncio.timeout(self.load_timeout_s):
                await self._redis.delete(KEY_PREFIX + key)
        except TimeoutError:
            raise StoreError(f"call state store {self.describe()}: no answer in {self.load_timeout_s} s") from None
        except self._errors as exc:
            raise StoreError(f"call state store {self.describe()}: {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()

    def describe(self) -> str:
        # No password in logs: redis://user:secret@host -> redis://host
        rest = self.url.split("://", 1)[-1].rsplit("@", 1)[-1]
        return f"redis://{rest}"


def build_store(url: str | None, ttl_s: float) -> CallStore:
    if not url or url == "memory":
        return MemoryStore(ttl_s)
    if url.startswith(STORE_SCHEMES):
        return RedisStore(url, ttl_s)
    raise ValueError(f"unknown call state store {url!r}: use memory or redis://host:port/db")


class StateWriter:
    """Writes one call's state after each turn without holding the turn up:
    one write in flight, at most one per MIN_WRITE_INTERVAL_S, the newest
    snapshot wins (a turn that ends while the previous write is out, or
    just after it, is written once that interval has passed)."""

    def __init__(self, store: CallStore, key: str, min_interval_s: float = MIN_WRITE_INTERVAL_S) -> None:
        self.store = store
        self.key = key
        self.min_interval_s = min_interval_s
        self._latest: CallState | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_write = -math.inf
        self.failures = 0

    def write(self, state: CallState) -> None:
        self._latest = state
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._latest is not None:
            wait = self._last_write + self.min_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # later writes replace _latest meanwhile
            state, self._latest = self._latest, None
            self._last_write = time.monotonic()
            try:
                await self.store.save(self.key, state)
            except StoreError as exc:
                # The call goes on; only a re-attach would miss this turn. One
                # warning per call: a store outage must not flood the log per turn.
                self.failures += 1
                level = logging.WARNING if self.failures == 1 else logging.DEBUG
                log.log(level, "call state not saved (%s)", exc)

    async def forget(self) -> None:
        """The call hung up: nothing more is written, and what was is
        deleted now instead of expiring an hour later (it is caller data,
        and a hung-up call does not re-attach)."""
        self._latest = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        try:
            await self.store.delete(self.key)
        except StoreError as exc:
            log.warning("stored call state not deleted; it expires on its own (%s)", exc)

    async def flush(self, timeout_s: float = 2.0) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
