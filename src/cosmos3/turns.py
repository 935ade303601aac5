"""Turn-taking on one engine: a long holder (a generation batch, minutes) and short holders (a Reasoner prompt's
encoding, a decode step or an admission: milliseconds) share one GPU and one copy of the weights.

The long holder holds the engine for its whole batch but calls `yield_point()` between units of its own work
(transformer layers, VAE frames). If a short holder is waiting there, the long holder lets the GPU finish what it
has queued (otherwise the short holder's kernels would run behind several already-launched video layers), lends
the engine to exactly one short unit, and takes it back as soon as that unit ends. So a waiting short holder gets
the engine within about one long unit, and the long holder never waits for more than one short unit per yield
point, however many short holders keep coming. With nobody waiting, `yield_point()` reads one integer.

Between long holds the same alternation holds: when both kinds wait for a free engine, the kind that did not go
last goes next; short holders among themselves go first come, first served.

Ground floor: no cosmos3 imports (the model's layer loop only sees a plain callable)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LONG, SHORT = "long", "short"


class EngineTurns:
    """`long()` for the generation worker, `short()` for conversations, `yield_point()` between the long holder's
    units. `synchronize` (e.g. the CUDA stream's) runs in the long holder's thread before it lends the engine."""

    def __init__(self, synchronize: Callable[[], None] | None = None):
        self.synchronize = synchronize
        self._cond = threading.Condition()
        self._owner: str | None = None  # who runs on the engine now: LONG, SHORT or nobody
        self._long_thread: int | None = None  # the long holder's thread while its hold lasts (lent out or not)
        self._parked = False  # the long holder lent the engine at a yield point and waits to resume
        self._last: str | None = None  # who had the engine last: the other kind goes next when both wait
        self._longs: deque[object] = deque()  # long holders waiting to start, in arrival order
        self._shorts: deque[object] = deque()  # short holders waiting, in arrival order
        self.lent = 0  # short units run at yield points (tests and benchmarks read it)

    # ------------------------------------------------------------------------------------------ state
    @property
    def waiting(self) -> int:
        """Short holders waiting for the engine."""
        return len(self._shorts)

    @property
    def waiting_long(self) -> int:
        """Long holders waiting to start."""
        return len(self._longs)

    @property
    def long_held(self) -> bool:
        """A long hold is under way (running, or lent to a short unit at a yield point)."""
        return self._long_thread is not None

    @property
    def short_held(self) -> bool:
        return self._owner == SHORT

    def locked(self) -> bool:
        """Whether a short holder has the engine now (`threading.Lock.locked`'s name, for the callers of the engine
        lock this replaces, which a conversation held; the long hold is `long_held`)."""
        return self.short_held

    def _next(self) -> str | None:
        """Who gets the engine once it is free (called holding `_cond`)."""
        long_ready = self._parked or (self._long_thread is None and bool(self._longs))
        if long_ready and (not self._shorts or self._last != LONG):
            return LONG
        if self._shorts:
            return SHORT
        return None

    # ------------------------------------------------------------------------------------------ holders
    @contextmanager
    def long(self) -> Iterator[None]:
        """Hold the engine for a long piece of work that calls `yield_point()` between its units (or never: then
        it holds the engine throughout, as a plain lock)."""
        ticket = object()
        with self._cond:
            self._longs.append(ticket)
            try:
                while not (
                    self._owner is None
                    and self._long_thread is None
                    and self._longs[0] is ticket
                    and self._next() == LONG
                ):
                    self._cond.wait()
            except BaseException:
                self._longs.remove(ticket)
                self._cond.notify_all()
                raise
            self._longs.popleft()
            self._owner, self._long_thread = LONG, threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                if self._owner == LONG:  # not when it failed while lent out: the short unit ends its own turn
                    self._owner = None
                self._long_thread, self._parked, self._last = None, False, LONG
                self._cond.notify_all()

    @contextmanager
    def short(self) -> Iterator[None]:
        """Hold the engine for one short unit of work; waits at most about one long unit while a long hold runs."""
        if self._long_thread == threading.get_ident():  # the long holder's own thread already has the engine
            yield
            return
        ticket = object()
        with self._cond:
            self._shorts.append(ticket)
            try:
                while not (self._owner is None and self._shorts[0] is ticket and self._next() == SHORT):
                    self._cond.wait()
            except BaseException:
                self._shorts.remove(ticket)
                self._cond.notify_all()
                raise
            self._shorts.popleft()
            self._owner = SHORT
        try:
            yield
        finally:
            with self._cond:
                self._owner, self._last = None, SHORT
                self._cond.notify_all()

    def yield_point(self) -> None:
        """Called by the long holder between its units: if a short holder waits, lend it the engine for one unit.
        A no-op (one integer read) when nobody waits, and in any thread but the long holder's."""
        if not self._shorts or self._long_thread != threading.get_ident() or self._owner != LONG:
            return
        if self.synchronize is not None:  # before lending: the short unit's kernels must not queue behind ours
            self.synchronize()
        with self._cond:
            self._owner, self._parked, self._last = None, True, LONG
            self.lent += 1
            self._cond.notify_all()
            # The waiting short holders cannot leave the queue without the engine, so one of them goes now; once
            # it is done `_next()` is LONG (the last was short), however many others wait.
            while not (self._owner is None and self._next() == LONG):
                self._cond.wait()
            self._owner, self._parked = LONG, False
