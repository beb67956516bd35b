"""At most one queued final decode per call on the shared ASR worker.

A final that is talked over stays queued (its words lead the next turn), so
a caller who ends turns faster than the worker decodes them (a client
spamming ``input.commit``, a line flapping between speech and silence)
would otherwise stack finals that every other call's finals queue behind.
Here a call's next final is handed to the worker only once its previous one
is done; of the finals waiting behind it only the newest is kept (an older
one belongs to a turn that has already been superseded).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from asr.whisper import SAMPLE_RATE

# The most talked-over audio a final carries in front of its own turn (the
# newest of it). Unbounded, a caller talking over turn after turn while the
# first final waited (backchannels, a TV in the room) grew one final to a
# minute of audio: a segmented decode every other call's finals waited
# behind, whose text was then cut to its newest 2,000 characters anyway.
MAX_CARRIED_S = 15.0


def newest(audio: np.ndarray, seconds: float = MAX_CARRIED_S) -> np.ndarray:
    keep = int(seconds * SAMPLE_RATE)
    return audio[-keep:] if len(audio) > keep else audio


class OneFinalPerCall:
    """One call's view of the shared ASR worker (anything with ``submit``);
    everything else passes through."""

    def __init__(self, asr: Any) -> None:
        self._asr = asr
        self._queued: asyncio.Future[Any] | None = None  # this call's final on the worker
        self._waiting: asyncio.Future[Any] | None = None  # the one next in line
        self._waiting_audio = np.zeros(0, np.float32)
        self._waiting_marks = False
        # The queued final whose end hands the waiting one over: one callback
        # per queued final, reading the newest waiting one when it fires. One
        # per superseding final held each one's audio (up to 15 s) until the
        # decode ended: a client committing 40 times a second pinned ~1 MB each.
        self._hands_over: asyncio.Future[Any] | None = None
        # Audio of talked-over turns that a waiting final carried in front of
        # its own when its owner gave it up (a preemptive turn aborted): it
        # leads the next final instead of being lost with that future.
        self._orphaned = np.zeros(0, np.float32)
        # Finals that decode talked-over audio in front of their own -> that audio.
        self._carrying: dict[asyncio.Future[Any], np.ndarray] = {}
        # The latest such final that finished decoding, and what it carried:
        # its owner may still give it up (abandon) after the decode.
        self._decoded_carry: tuple[asyncio.Future[Any], np.ndarray] | None = None
        self._closed = False
        self.superseded = 0  # finals merged into a newer one

    def __getattr__(self, name: str) -> Any:
        return getattr(self._asr, name)

    def submit(self, call_id: str, audio: np.ndarray, final: bool, marks: bool = False) -> asyncio.Future[Any]:
        if not final:
            return self._asr.submit(call_id, audio, final, marks)
        if self._closed:
            gone: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            gone.cancel()
            return gone
        # Finals given up since the last one (cancelled by their owner)
        # hand on the talked-over audio they carried, in the order they were
        # submitted. Taken here, not in a done-callback: a forced end cancels
        # the preemptive turn and submits its own final in the same step,
        # before any callback runs, and this final went without those words.
        carried = self._orphaned
        for future in [f for f in self._carrying if f.cancelled()]:
            carried = newest(np.concatenate([carried, self._carrying.pop(future)]))
        self._orphaned = np.zeros(0, np.float32)
        nothing_waits = self._waiting is None or self._waiting.done()
        if (self._queued is None or self._queued.done()) and nothing_waits:
            joined = np.concatenate([carried, audio]) if len(carried) else audio
            self._queued = self._asr.submit(call_id, joined, True, marks)
            self._carry(self._queued, carried)
            return self._queued
        if self._waiting is not None and not self._waiting.done():
            # A newer final replaces the waiting one, but its audio is kept in
            # front: a talked-over turn's words then lead this decode instead
            # of being lost with the older future.
            carried = newest(np.concatenate([carried, self._waiting_audio]))
            self._carrying.pop(self._waiting, None)  # its carried audio rides on in the new one
            self._waiting.cancel()
            self.superseded += 1
        audio = np.concatenate([carried, audio]) if len(carried) else audio
        waiting: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting, self._waiting_audio, self._waiting_marks = waiting, audio, marks
        self._carry(waiting, carried)
        if self._hands_over is not self._queued:
            self._hands_over = self._queued
            self._queued.add_done_callback(lambda done: self._hand_over(call_id, done))
        return waiting

    def _hand_over(self, call_id: str, done: asyncio.Future[Any]) -> None:
        """This call's final on the worker is done: the one waiting, if any, goes next."""
        if done is not self._queued:
            # A newer final reached the worker in the meantime (the waiting
            # one was given up, then a final went straight through before
            # this callback ran): the waiting one goes after that one.
            return
        waiting = self._waiting
        if waiting is None or waiting.done() or self._closed:  # given up, or the call hung up
            return
        inner = self._asr.submit(call_id, self._waiting_audio, True, self._waiting_marks)
        self._queued = inner
        _chain(inner, waiting)

    def _carry(self, future: asyncio.Future[Any], carried: np.ndarray) -> None:
        """``future`` decodes ``carried`` (talked-over turns' audio) in front
        of its own turn's. Cancelled by its owner (a preemptive turn the
        caller went on past), not superseded here nor by a hang-up, the
        carried audio leads the next final instead of being lost with it;
        its own audio is in the caller's next turn anyway."""
        if len(carried):
            self._carrying[future] = carried
            future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return  # its carried audio leads the next final (submit takes it)
        carried = self._carrying.pop(future, None)
        if carried is not None and not self._closed:
            self._decoded_carry = (future, carried)

    def abandon(self, future: asyncio.Future[Any]) -> None:
        """The owner of a final that finished decoding gives its words up (a
        preemptive turn the caller went on past): the talked-over audio it
        carried leads the next final, as when it is cancelled mid-decode; its
        own audio is in the caller's next turn anyway."""
        if self._decoded_carry is not None and self._decoded_carry[0] is future and not self._closed:
            self._orphaned = newest(np.concatenate([self._orphaned, self._decoded_carry[1]]))
            self._decoded_carry = None

    async def settle(self, timeout_s: float) -> None:
        """Wait, at most ``timeout_s``, for this call's finals on the worker
        (the one decoding and the one next in line) to be done."""
        pending = {f for f in (self._queued, self._waiting) if f is not None and not f.done()}
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    def close(self) -> None:
        """The call is over: nothing of it is handed to the worker any more."""
        self._closed = True
        self._carrying.clear()
        for future in (self._waiting, self._queued):
            if future is not None and not future.done():
                future.cancel()


def _chain(inner: asyncio.Future[Any], outer: asyncio.Future[Any]) -> None:
    """``outer`` settles as ``inner`` does; cancelling ``outer`` cancels ``inner``."""

    def settle(_: object) -> None:
        if outer.done():
            return
        if inner.cancelled():
            outer.cancel()
        elif inner.exception() is not None:
            outer.set_exception(inner.exception())  # type: ignore[arg-type]
        else:
            outer.set_result(inner.result())

    def give_up(_: object) -> None:
        if outer.cancelled() and not inner.done():
            inner.cancel()

    inner.add_done_callback(settle)
    outer.add_done_callback(give_up)
