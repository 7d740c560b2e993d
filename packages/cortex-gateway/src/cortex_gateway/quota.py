"""Per-key limits and the fair wait queue of each model.

`LimitBook` keeps, per key name, the requests in flight and the last minute's requests and
tokens; `admit` either books a request or raises 429 with the seconds until the key may try
again. Windows slide over the last 60 s (a fixed clock tick would let a key spend two
minutes' worth across a boundary). Tokens are booked when a request finishes, from its
usage, so a key over its tokens/minute is refused from the next request on.

`FairQueue` caps the requests relayed at once per model (`router.max_concurrent_per_model`)
and holds the rest. A freed slot goes to the next *key* in round-robin order, and within a
key to its oldest request: a key with 50 queued requests and a key with one alternate, so
the one is served within the first two slots that free up, not after the 50.

Both live on the event loop and are driven without awaits between a check and its booking,
so nothing interleaves; the clock is injected.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cortex_core.errors import ApiError
from cortex_gateway.auth import Caller

WINDOW_SECS = 60.0


@dataclass(slots=True)
class _KeyUsage:
    in_flight: int = 0
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def expire(self, now: float) -> None:
        horizon = now - WINDOW_SECS
        while self.requests and self.requests[0] <= horizon:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= horizon:
            self.token_sum -= self.tokens.popleft()[1]

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.requests and not self.tokens


class LimitBook:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._usage: dict[str, _KeyUsage] = {}

    def admit(self, caller: Caller) -> None:
        """Book one request of `caller`, or raise 429 naming the limit it hit."""
        limits = caller.limits
        if not (limits.concurrent or limits.requests_per_minute or limits.tokens_per_minute):
            return
        now = self._clock()
        usage = self._usage.setdefault(caller.name, _KeyUsage())
        usage.expire(now)
        if limits.concurrent and usage.in_flight >= limits.concurrent:
            raise _limited(caller, f"{limits.concurrent} concurrent requests", 1.0)
        if limits.requests_per_minute and len(usage.requests) >= limits.requests_per_minute:
            wait = usage.requests[0] + WINDOW_SECS - now
            raise _limited(caller, f"{limits.requests_per_minute} requests per minute", wait)
        if limits.tokens_per_minute and usage.token_sum >= limits.tokens_per_minute:
            wait = usage.tokens[0][0] + WINDOW_SECS - now
            raise _limited(caller, f"{limits.tokens_per_minute} tokens per minute", wait)
        usage.in_flight += 1
        usage.requests.append(now)

    def finished(self, caller: Caller, tokens: int) -> None:
        """The request `admit` booked is over, having spent `tokens` (prompt + completion)."""
        usage = self._usage.get(caller.name)
        if usage is None:
            return
        usage.in_flight -= 1
        if tokens > 0 and caller.limits.tokens_per_minute:
            usage.tokens.append((self._clock(), tokens))
            usage.token_sum += tokens
        usage.expire(self._clock())
        if usage.idle:
            del self._usage[caller.name]  # the book holds only keys with something to remember

    def in_flight(self, name: str) -> int:
        usage = self._usage.get(name)
        return usage.in_flight if usage is not None else 0


def _limited(caller: Caller, limit: str, retry_after: float) -> ApiError:
    return ApiError(
        429,
        f"API key '{caller.name}' is at its limit of {limit}; retry after the Retry-After seconds",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after=max(1, math.ceil(retry_after)),
    )


class _ModelQueue:
    __slots__ = ("count", "in_use", "waiting")

    def __init__(self) -> None:
        self.in_use = 0
        # Key name → its waiters, oldest first; the dict's order is the round-robin order.
        self.waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self.count = 0


class FairQueue:
    """At most `slots` requests per model at once; the waiting ones served round-robin by key."""

    def __init__(self, slots: int, max_waiting: int, retry_after: float) -> None:
        self._slots = slots
        self._max_waiting = max_waiting
        self._retry_after = retry_after
        self._models: dict[str, _ModelQueue] = {}

    @property
    def enabled(self) -> bool:
        return self._slots > 0

    def waiting(self, model: str) -> int:
        queue = self._models.get(model)
        return queue.count if queue is not None else 0

    async def enter(self, model: str, key: str) -> None:
        """Return once the request holds one of `model`'s slots; pair with `leave(model)`."""
        turn = self.join(model, key)
        if turn is None:
            return
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.leave(model)  # granted as the client went away: pass the slot on
            else:
                self._forget(self._models[model], key, turn)
            raise

    def join(self, model: str, key: str) -> asyncio.Future[None] | None:
        """Take a slot now (None) or queue behind `key`'s earlier requests: the future
        completes when a slot is handed over. Raises 429 when the queue is full."""
        queue = self._models.setdefault(model, _ModelQueue())
        if queue.in_use < self._slots and not queue.count:
            queue.in_use += 1
            return None
        if queue.count >= self._max_waiting:
            raise ApiError(
                429,
                f"too many requests are waiting for '{model}' ({queue.count}, the limit is "
                "router.max_waiting_per_model); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                retry_after=self._retry_after,
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.waiting.setdefault(key, deque()).append(turn)
        queue.count += 1
        return turn

    def leave(self, model: str) -> None:
        """A slot of `model` is free: hand it to the next key's oldest waiter, or give it back."""
        queue = self._models[model]
        while queue.waiting:
            key, turns = next(iter(queue.waiting.items()))
            turn = turns.popleft()
            queue.count -= 1
            if turns:
                queue.waiting.move_to_end(key)  # this key had its turn: it goes to the back
            else:
                del queue.waiting[key]
            if not turn.done():
                turn.set_result(None)  # the slot moves to the waiter; in_use is unchanged
                return
        queue.in_use -= 1
        if not queue.in_use:
            del self._models[model]

    def _forget(self, queue: _ModelQueue, key: str, turn: asyncio.Future[None]) -> None:
        turns = queue.waiting.get(key)
        if turns is None or turn not in turns:
            return
        turns.remove(turn)
        queue.count -= 1
        if not turns:
            del queue.waiting[key]
