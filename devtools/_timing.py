"""Handler time of local servers, for benchmarks: an ASGI middleware and a thread-safe clock.

``timed(app, clock, label)`` wraps an ASGI app; every HTTP request it serves adds the handler's
own time to ``clock`` under ``label`` (a string, or a function of the ASGI scope): from the app
being called (uvicorn has parsed the request head) to the app handing over the last of its
response (taken just before that last write, so it always lies within what the client waited,
even if the server's thread then waits for the GIL; if no response is sent, until the app
returns). The sandbox wraps its stand-ins with it (``Sandbox.timing``), so a benchmark
driving the connector over real HTTP can subtract the stand-ins' own time from what it measured::

    before = clock.reading()
    ...  # requests to the connector, which calls the stand-ins
    spent = clock.reading() - before
    spent.seconds_of("ehr", "graph")

``reading()`` first waits (bounded) until no wrapped request is in flight, so a handler that has
sent its response but not yet returned is not missed. Cost per request: two ``perf_counter``
calls and two short lock holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClockReading", "HandlerClock", "timed"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ClockReading:
    """Handler seconds and request counts per label, at one moment (or between two)."""

    seconds: Mapping[str, float] = field(default_factory=dict)
    requests: Mapping[str, int] = field(default_factory=dict)

    def __sub__(self, earlier: ClockReading) -> ClockReading:
        labels = set(self.seconds) | set(earlier.seconds)
        return ClockReading(
            seconds={k: self.seconds.get(k, 0.0) - earlier.seconds.get(k, 0.0) for k in labels},
            requests={k: self.requests.get(k, 0) - earlier.requests.get(k, 0) for k in labels},
        )

    def __add__(self, other: ClockReading) -> ClockReading:
        labels = set(self.seconds) | set(other.seconds)
        return ClockReading(
            seconds={k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0) for k in labels},
            requests={k: self.requests.get(k, 0) + other.requests.get(k, 0) for k in labels},
        )

    def seconds_of(self, *labels: str) -> float:
        return sum(self.seconds.get(label, 0.0) for label in labels)

    def requests_of(self, *labels: str) -> int:
        return sum(self.requests.get(label, 0) for label in labels)


class HandlerClock:
    """Total handler time and request count per label; safe across server threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._seconds: dict[str, float] = {}
        self._requests: dict[str, int] = {}
        self._in_flight = 0

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _leave(self, label: str, seconds: float) -> None:
        with self._lock:
            self._seconds[label] = self._seconds.get(label, 0.0) + seconds
            self._requests[label] = self._requests.get(label, 0) + 1
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def reading(self, *, settle: float = 1.0) -> ClockReading:
        """The totals so far, once no request is in flight (or after ``settle`` seconds)."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=settle)
            return ClockReading(seconds=dict(self._seconds), requests=dict(self._requests))


def timed(app: Any, clock: HandlerClock, label: str | Callable[[Scope], str]) -> ASGIApp:
    """``app``, its HTTP requests' handler time added to ``clock`` under ``label``."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        name = label(scope) if callable(label) else label
        answered: float | None = None

        async def timed_send(message: MutableMapping[str, Any]) -> None:
            nonlocal answered
            if message.get("type") == "http.response.body" and not message.get("more_body"):
                answered = time.perf_counter()  # before the last write: the client can't be done
            await send(message)

        clock._enter()
        started = time.perf_counter()
        try:
            await app(scope, receive, timed_send)
        finally:
            clock._leave(name, (answered or time.perf_counter()) - started)

    return wrapper
