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

One connection writes a key at a time: its owner, the connection that last
claimed it (:meth:`CallStore.claim`, on re-attach) or first wrote it. A
connection a re-attach replaced (a half-open socket the client gave up on, a
Twilio stream on another replica) may still be live; its writes and its
hang-up's delete are refused (``save`` returns False), so it can neither
roll the conversation back nor delete it, and the session ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

# One hash per call: its state and its owner (the call id of the connection
# that writes it) under one key with one expiry. Two keys with an expiry
# each (the layout before) could lose only the owner to maxmemory's
# volatile-ttl eviction, and with it the fence: a replaced connection wrote
# the conversation back and ended the live call. ("callh": the two-key
# layout's "firstline:call:" strings are left to expire, never misread.)
# The call's key is hashed into the name ("callk"; the "callh" names before
# held it raw, and expire): a native or Realtime resume token is a
# credential, and key names are what SCAN, MONITOR, SLOWLOG, replicas and
# RDB files show to anyone with read access to Redis.
KEY_PREFIX = "firstline:callk:"


def redis_key(key: str) -> str:
    """The Redis key name of a call's key ("native:<token>", "twilio:<callSid>")."""
    return KEY_PREFIX + hashlib.sha256(key.encode()).hexdigest()


# KEYS: the call. ARGV: the owner, 1 to claim an empty key, ttl. A claim
# is dated by Redis's own clock (claimed_at, Unix seconds): a re-attach whose
# claim went unanswered claims later only if nobody claimed since it began.
# One function for both claims (a Lua local, defined in each script).
_CLAIM_AS_OWNER = """
local function claim_as_owner(owner)
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'owner', owner, 'claimed_at', now[1] .. '.' .. string.format('%06d', now[2]))
  redis.call('HDEL', KEYS[1], 'gone')
end
"""
CLAIM_SCRIPT = (
    _CLAIM_AS_OWNER
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state or ARGV[2] == '1' then
  claim_as_owner(ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return state
"""
)
# ARGV: the owner, ttl, since (Unix seconds). 0: a claim since then holds it.
CLAIM_UNLESS_CLAIMED_SINCE_SCRIPT = (
    _CLAIM_AS_OWNER
    + """
local claimed = redis.call('HGET', KEYS[1], 'claimed_at')
if claimed and tonumber(claimed) > tonumber(ARGV[3]) and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
claim_as_owner(ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
)
# ARGV: the owner, ttl. 1: the owner writes the key now. The fence of a
# call that hung up (gone) is free: a new stream of the same carrier call
# (a TwiML <Stream> after the first one stopped) starts as any new call.
OWN_IF_FREE_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] and not redis.call('HGET', KEYS[1], 'gone') then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('HDEL', KEYS[1], 'gone')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# ARGV: the owner, the state, ttl. 0: another owner holds the key.
SAVE_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
  redis.call('HDEL', KEYS[1], 'gone')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# ARGV: the owner, ttl. The owner's delete of a key a re-attach claimed
# takes the state and keeps the fence (owner, claimed_at) for the TTL,
# marked gone: without it the connection the re-attach replaced (a
# half-open socket its idle guard ends a minute later) wrote the hung-up
# conversation back as an unowned key, and a re-attach older than the last
# claim took it. A key never claimed has no replaced connection: it goes.
DELETE_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
if ARGV[1] == '' or not redis.call('HGET', KEYS[1], 'claimed_at') then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HDEL', KEYS[1], 'state')
redis.call('HSET', KEYS[1], 'gone', '1')  -- the owner is ARGV[1] already
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
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
    # The whole system prompt: the instructions and the system text a client
    # added (Realtime system items), joined, as every version reads it.
    system_prompt: str
    messages: list[dict[str, str]] = field(default_factory=list)
    carry_over: str = ""
    turn: int = 0
    # The same two apart, so a re-attach that sends its instructions or
    # items again replaces or finds them instead of stacking copies. None:
    # written by an older version, which stored only the joined prompt.
    instructions: str | None = None
    system_items: list[str] = field(default_factory=list)
    # Why the server ended the call (max_call_length, a flood), if it did: a
    # tombstone in place of the conversation, so that nothing picks the call
    # up again. Twilio fetches <Connect action> whenever a stream closes, and
    # its re-attach carried a call the server had ended on for up to
    # MAX_REATTACH more streams.
    ended: str = ""

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
            instructions = data.get("instructions")
            return cls(
                str(data["system_prompt"]),
                messages,
                str(data.get("carry_over", "")),
                int(data["turn"]),
                None if instructions is None else str(instructions),
                [str(item) for item in data.get("system_items", [])],
                str(data.get("ended", "")),
            )
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

    async def claim(self, key: str, owner: str, *, when_empty: bool = True) -> CallState | None:
        """What is stored under ``key``, and from now on only ``owner`` writes
        it. ``when_empty=False``: claim only a key that holds a state (a
        client's resume token nothing is stored under is not taken)."""
        ...

    async def own_if_free(self, key: str, owner: str) -> bool:
        """Make ``owner`` the writer of ``key`` unless another connection is
        (a new call's key: the first to start owns it). True if it is now."""
        ...

    async def claim_unless_claimed_since(self, key: str, owner: str, since: float) -> bool:
        """A claim that went unanswered, made again: ``owner`` takes ``key``
        unless another connection claimed it after ``since`` (Unix seconds:
        when this one tried first), a newer re-attach that must not be ended
        by an older one's late claim. True if ``owner`` holds it now."""
        ...

    async def save(self, key: str, state: CallState, owner: str = "") -> bool:
        """Write ``state``; False (nothing written) when another owner has
        claimed ``key``. An empty owner writes only a key nobody owns."""
        ...

    async def delete(self, key: str, owner: str = "") -> bool:
        """Delete what is stored; False when another owner has claimed
        ``key``. Where a re-attach claimed it, ``owner``'s fence stays for
        the TTL: the connection it replaced still cannot write the hung-up
        call back, and only a new stream of the call (``own_if_free``) or a
        claim takes it. A key never claimed goes whole."""
        ...

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
        # key -> (expiry, owner); kept apart from the states so that a claim
        # of a key with nothing stored yet (a Twilio call before its first
        # turn) still holds off the connection it replaced.
        self._owners: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # key -> when it was last claimed (Unix seconds), kept while its owner is.
        self._claimed_at: dict[str, float] = {}
        # Keys whose owner hung up (deleted): the fence holds against other
        # writers, and a new stream of the call may own it (DELETE_SCRIPT).
        self._gone: set[str] = set()

    def sweep(self) -> int:
        """Drop every state past its TTL (oldest first: each write moves its
        key to the end with a fresh expiry); how many went. A state was
        dropped only when read or when the caps pushed it out, so a quiet
        server held callers' transcripts long past the TTL."""
        now, gone = time.monotonic(), 0
        while self._states and next(iter(self._states.values()))[0] < now:
            key, (_, text) = self._states.popitem(last=False)
            self.bytes -= len(text.encode("utf-8"))
            gone += 1
            # Its owner only if that lapsed too: a claim since the last write
            # renewed it, and that connection's fence must hold.
            owner = self._owners.get(key)
            if owner is not None and owner[0] < now:
                self._drop_owner(key)
        while self._owners and next(iter(self._owners.values()))[0] < now:
            self._drop_owner(next(iter(self._owners)))
        return gone

    async def load(self, key: str) -> CallState | None:
        entry = self._states.get(key)
        if entry is None or entry[0] < time.monotonic():
            self._drop(key)
            return None
        return CallState.from_json(entry[1])

    async def claim(self, key: str, owner: str, *, when_empty: bool = True) -> CallState | None:
        state = await self.load(key)
        if state is not None or when_empty:
            self._own(key, owner, time.monotonic() + self.ttl_s)
            self._claimed_at[key] = time.time()
        return state

    async def claim_unless_claimed_since(self, key: str, owner: str, since: float) -> bool:
        if self._claimed_at.get(key, 0.0) > since and self._owned_by_another(key, owner):
            return False
        self._own(key, owner, time.monotonic() + self.ttl_s)
        self._claimed_at[key] = time.time()
        return True

    async def own_if_free(self, key: str, owner: str) -> bool:
        if self._owned_by_another(key, owner) and key not in self._gone:
            return False
        self._own(key, owner, time.monotonic() + self.ttl_s)
        return True

    def _own(self, key: str, owner: str, expires: float) -> None:
        self._gone.discard(key)
        self._owners[key] = (expires, owner)
        self._owners.move_to_end(key)
        # Oldest first: drop the lapsed, and keep as many as states at most.
        while self._owners and (
            len(self._owners) > self.max_calls or next(iter(self._owners.values()))[0] < time.monotonic()
        ):
            self._drop_owner(next(iter(self._owners)))

    def _owned_by_another(self, key: str, owner: str) -> bool:
        entry = self._owners.get(key)
        if entry is None or entry[0] < time.monotonic():
            self._drop_owner(key)
            return False
        return entry[1] != owner

    async def save(self, key: str, state: CallState, owner: str = "") -> bool:
        text = encode_state(state)
        self.sweep()
        if self._owned_by_another(key, owner):
            return False
        self._drop(key)
        expires = time.monotonic() + self.ttl_s
        self._states[key] = (expires, text)
        if owner:
            self._own(key, owner, expires)
        self.bytes += len(text.encode("utf-8"))
        while len(self._states) > self.max_calls or self.bytes > self.max_bytes:
            old_key, (_, old) = self._states.popitem(last=False)
            self._drop_owner(old_key)
            self.bytes -= len(old.encode("utf-8"))
        return True

    async def delete(self, key: str, owner: str = "") -> bool:
        if self._owned_by_another(key, owner):
            return False
        self._drop(key)
        if not owner or key not in self._claimed_at:
            self._drop_owner(key)
            return True
        self._own(key, owner, time.monotonic() + self.ttl_s)  # the fence stays (DELETE_SCRIPT)
        self._gone.add(key)
        return True

    def _drop_owner(self, key: str) -> None:
        self._owners.pop(key, None)
        self._claimed_at.pop(key, None)
        self._gone.discard(key)

    def _drop(self, key: str) -> None:
        entry = self._states.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry[1].encode("utf-8"))

    async def close(self) -> None:
        self._states.clear()
        self._owners.clear()
        self._claimed_at.clear()
        self._gone.clear()
        self.bytes = 0

    def describe(self) -> str:
        return "memory"


class RedisStore:
    """One hash per call under ``firstline:callk:<sha256 of key>``: its state (JSON)
    and its owner, with one expiry."""

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
        # One script per operation, so that checking the owner and writing
        # is one atomic step on the server (sent by SHA once loaded).
        self._claim = self._redis.register_script(CLAIM_SCRIPT)
        self._save = self._redis.register_script(SAVE_SCRIPT)
        self._delete = self._redis.register_script(DELETE_SCRIPT)
        self._own_if_free = self._redis.register_script(OWN_IF_FREE_SCRIPT)
        self._claim_unless = self._redis.register_script(CLAIM_UNLESS_CLAIMED_SINCE_SCRIPT)

    async def check(self) -> None:
        """At start-up: a wrong URL is a clear error, not a silent loss of every call's state."""
        try:
            await self._redis.ping()
        except self._errors as exc:
            raise StoreError(f"cannot reach the call state store {self.describe()}: {exc}") from exc

    async def load(self, key: str) -> CallState | None:
        raw = await self._bounded(self._redis.hget(redis_key(key), "state"))
        return None if raw is None else CallState.from_json(raw)

    async def claim(self, key: str, owner: str, *, when_empty: bool = True) -> CallState | None:
        raw = await self._bounded(self._claim(keys=[redis_key(key)], args=[owner, int(when_empty), self._ttl()]))
        return None if raw is None else CallState.from_json(raw)

    async def own_if_free(self, key: str, owner: str) -> bool:
        return bool(await self._bounded(self._own_if_free(keys=[redis_key(key)], args=[owner, self._ttl()])))

    async def claim_unless_claimed_since(self, key: str, owner: str, since: float) -> bool:
        args = [owner, self._ttl(), f"{since:.6f}"]
        return bool(await self._bounded(self._claim_unless(keys=[redis_key(key)], args=args)))

    async def save(self, key: str, state: CallState, owner: str = "") -> bool:
        text = encode_state(state)
        try:
            written = await self._save(keys=[redis_key(key)], args=[owner, text, self._ttl()])
        except self._errors as exc:
            raise StoreError(f"call state store {self.describe()}: {exc}") from exc
        return bool(written)

    async def delete(self, key: str, owner: str = "") -> bool:
        return bool(await self._bounded(self._delete(keys=[redis_key(key)], args=[owner, self._ttl()])))

    def _ttl(self) -> int:
        return max(1, int(self.ttl_s))

    async def _bounded(self, command: Awaitable[Any]) -> Any:
        """A round trip on a call's start or end: at most load_timeout_s."""
        try:
            async with asyncio.timeout(self.load_timeout_s):
                return await command
        except TimeoutError:
            raise StoreError(f"call state store {self.describe()}: no answer in {self.load_timeout_s} s") from None
        except self._errors as exc:
            raise StoreError(f"call state store {self.describe()}: {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()

    def describe(self) -> str:
        # No password in logs: redis://user:secret@host -> redis://host, and
        # no query (redis://host/0?password=secret, unix://...&password=).
        scheme, _, rest = self.url.partition("://")
        if not rest:
            scheme, rest = "redis", scheme
        return f"{scheme}://{rest.split('?', 1)[0].rsplit('@', 1)[-1]}"


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
    just after it, is written once that interval has passed). Writes as
    ``owner``; once a re-attach elsewhere has claimed the key, it writes
    nothing more and calls ``on_superseded`` once."""

    def __init__(
        self,
        store: CallStore,
        key: str,
        owner: str = "",
        min_interval_s: float = MIN_WRITE_INTERVAL_S,
        on_superseded: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.owner = owner
        self.min_interval_s = min_interval_s
        self.on_superseded = on_superseded
        self.superseded = False
        self._latest: CallState | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_write = -math.inf
        self.failures = 0
        self._owning: asyncio.Task[bool] | None = None
        self._claim_since: float | None = None
        self.forgotten = False

    def own_now(self) -> None:
        """A new call's key (a carrier's call id): take it now, at the call's
        start, not at its first write: a later stream naming the same call
        id (no re-attach proof) must not write it first and so end this call."""
        self._owning = asyncio.ensure_future(self.store.own_if_free(self.key, self.owner))
        self._owning.add_done_callback(self._owned)

    def _owned(self, owning: asyncio.Future[bool]) -> None:
        """Another connection holds the key (a live stream of the same call,
        or the tombstone of a call the server ended): this one ends now, not
        at its first write, after its caller was greeted and had a turn."""
        if owning.cancelled() or owning.exception() is not None:
            return  # a store that does not answer: the writes will say
        if not owning.result() and not self.forgotten and not self.superseded:
            self._superseded()

    def claim_first(self, since: float) -> None:
        """A re-attach whose claim the store did not answer (down, or slow)
        at ``since`` (Unix seconds): the replaced connection is still the
        key's owner there, and this call's first write would be refused and
        end it (``call_reattached``) once the store is back. Claim the key
        before the first write the store answers, unless a newer re-attach
        claimed it meanwhile (then this one is the replaced connection);
        until then the writes fail as any do."""
        self._claim_since = since

    def write(self, state: CallState) -> None:
        if self.superseded or self.forgotten:
            # Forgotten: the call hung up; a write now (a turn that outlived
            # it) would put the deleted conversation back for the full TTL.
            return
        self._latest = state
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        if self._owning is not None:
            owning, self._owning = self._owning, None
            try:
                owned = await owning
            except StoreError:
                owned = True  # the writes will say
            if not owned:
                return  # _owned ended the call when the answer came
        while self._latest is not None:
            wait = self._last_write + self.min_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # later writes replace _latest meanwhile
            state, self._latest = self._latest, None
            self._last_write = time.monotonic()
            try:
                if self._claim_since is not None:
                    # The past stored there is what this call already went
                    # on without: the write below replaces it.
                    if not await self.store.claim_unless_claimed_since(self.key, self.owner, self._claim_since):
                        self._superseded()
                        return
                    self._claim_since = None
                written = await self.store.save(self.key, state, self.owner)
            except StoreError as exc:
                # The call goes on; only a re-attach would miss this turn. One
                # warning per call: a store outage must not flood the log per turn.
                self.failures += 1
                level = logging.WARNING if self.failures == 1 else logging.DEBUG
                log.log(level, "call state not saved (%s)", exc)
                continue
            if not written:
                self._superseded()

    def _superseded(self) -> None:
        self.superseded, self._latest = True, None
        log.info("call state not saved: the call re-attached on another connection")
        if self.on_superseded is not None:
            self.on_superseded()

    async def forget(self, ended: str = "") -> None:
        """The call hung up: nothing more is written, and what was is
        deleted now instead of expiring an hour later (it is caller data,
        and a hung-up call does not re-attach). Not when a re-attach has
        taken the key over: that connection's conversation goes on.
        ``ended``: the server ended the call, and why: the conversation is
        replaced by a tombstone saying so (CallState.ended) for the TTL."""
        self.forgotten = True
        self._latest = None
        if self._owning is not None:
            self._owning.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._owning
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.superseded:
            return
        try:
            if self._claim_since is not None:
                # It hung up before any write took the key: take it (unless
                # a newer re-attach did) to delete it, or the conversation
                # stays under the replaced connection's name for the TTL.
                if not await self.store.claim_unless_claimed_since(self.key, self.owner, self._claim_since):
                    return
            if ended:
                await self.store.save(self.key, CallState("", ended=ended), self.owner)
            else:
                await self.store.delete(self.key, self.owner)
        except StoreError as exc:
            log.warning("stored call state not deleted; it expires on its own (%s)", exc)

    async def flush(self, timeout_s: float = 2.0) -> None:
        if self._task is not None and not self._task.done():
            # asyncio.wait: neither raises the write's own end nor swallows a
            # cancel of the caller (3.11's wait_for can lose one).
            await asyncio.wait({self._task}, timeout=timeout_s)
