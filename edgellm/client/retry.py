"""When a failed request is sent again, and after how long."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from edgellm.client.errors import EdgeLLMError

RETRIED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter. Only a request that has received no token is retried, and only on
    RESOURCE_EXHAUSTED (a full queue: waiting at least the server's `retry_after`), UNAVAILABLE (a daemon
    that is draining, gone or not reachable: with several addresses the retry goes to another one) or a
    CANCELLED this client did not ask for (a daemon whose server closed as the request arrived)."""

    max_attempts: int = 5  # sends in all, the first included; 1 disables retries
    initial_backoff: float = 0.05  # seconds before the first retry (before jitter)
    max_backoff: float = 2.0  # the longest wait between attempts, retry_after aside
    multiplier: float = 2.0
    jitter: float = 0.5  # each wait is drawn from [1 - jitter, 1] x its backoff, so clients spread out

    def should_retry(self, error: EdgeLLMError, attempt: int, cancelled_here: bool = False) -> bool:
        """attempt: how many sends have failed so far (1 after the first); cancelled_here: this client cancelled
        the call or closed its channel."""
        if attempt >= self.max_attempts or error.tokens_streamed or cancelled_here:
            return False
        return error.code in RETRIED

    def delay(self, error: EdgeLLMError, attempt: int) -> float:
        """Seconds to wait before send number attempt + 1: the backoff, jittered, and never under retry_after."""
        backoff = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        wait = backoff * random.uniform(1 - self.jitter, 1)
        if error.retry_after is not None:
            # The server's hint is a floor; jitter above it keeps clients it refused together from returning together.
            wait = max(wait, error.retry_after * random.uniform(1, 1 + self.jitter / 2))
        return wait


NO_RETRIES = RetryPolicy(max_attempts=1)


def session_start_delay(policy: RetryPolicy, error: EdgeLLMError, attempt: int) -> float | None:
    """Seconds before a Session start that ended with `error` is sent again, or None when it is not: a stream is
    pinned to its daemon, so only a full queue is worth another try on it (UNAVAILABLE there means draining)."""
    if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or not policy.should_retry(error, attempt):
        return None
    return policy.delay(error, attempt)

