"""The one exception the client raises for a failed call or request: the gRPC status, and when to retry."""

from __future__ import annotations

import grpc


class EdgeLLMError(Exception):
    """A call or request that failed: `.code` (a grpc.StatusCode), `.message`, `.retry_after` (seconds the
    server asked the client to wait, RESOURCE_EXHAUSTED only, else None) and `.tokens_streamed` (tokens
    this request had already received when it failed: such a request is never retried)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None,
                 tokens_streamed: int = 0):
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.tokens_streamed = tokens_streamed
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, tokens_streamed: int = 0) -> "EdgeLLMError":
        """From a failed gRPC call (sync or asyncio): its status, details and `retry-after-ms` trailer."""
        retry_after = None
        for key, value in e.trailing_metadata() or ():
            if key == "retry-after-ms":
                try:
                    retry_after = int(value) / 1000
                except ValueError:
                    pass  # a malformed hint is no hint
        message = e.details() or ""
        if tokens_streamed:
            message += f" (after {tokens_streamed} tokens had streamed: not retried, the answer would start over)"
        return cls(e.code(), message, retry_after, tokens_streamed)


CODES_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """A google.rpc.Code number (RequestError.code, Refused.code) as a grpc.StatusCode."""
    return CODES_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
