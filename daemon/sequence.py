"""A request as the engine sees it (`Sequence`), a conversation's kept cache, and the events a request's sink gets.

The gRPC handlers build a `Sequence` and submit it; from then on only the engine thread changes its state,
except for the flags the event loop sets (`cancel_requested`, `failure`, `Conversation.close_requested`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from daemon.conversation import Conversation

if TYPE_CHECKING:  # the scheduler imports this module and stays free of numpy
    from daemon.sampling import Sampler, SamplingParams
    from daemon.speculative import SpecState
    from daemon.structured_output import GrammarState
    from daemon.tool_calls import ToolCallReader
    from daemon.text_stream import TextStream


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"
    UNAVAILABLE = "unavailable"  # ended before its first token because the server is going away: retry elsewhere


class Priority(enum.IntEnum):
    """Lower value, served first."""

    INTERACTIVE = 0
    NORMAL = 1
    BACKGROUND = 2


class QueueFullError(Exception):
    """The wait queue is at its bound; the client should retry later."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    tool_calls: list = field(default_factory=list)  # daemon.tool_calls.ToolCall completed by these tokens


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float
    total_s: float
    stop_sequence: str = ""
    message: str = ""
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the conversation's or the prefix cache
    reprefilled: bool = False  # the conversation's cache had been evicted: its history was prefilled again
    preemptions: int = 0  # times this request was paused for a higher priority class


Sink = Callable[[TokenEvent | FinishEvent], None]


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it. Only the engine thread mutates it after submit()."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deadline: float | None = None  # clock value
    sink: Sink = print
    arrival: float = 0.0
    priority: Priority = Priority.NORMAL
    conversation: Conversation | None = None
    stream_interval: float = 0.0  # seconds between chunks after the first token; 0: every token at once
    grammar: GrammarState | None = None  # the output's format (handed to the sampler at submit)
    tool_calls: ToolCallReader | None = None  # a request with tools: turns the output's call markup into ToolCalls
    cache_scope: bytes | None = None  # the prefix cache's scope (daemon/prefix_cache.py); None: no prefix cache
    speculative: bool = True  # may use speculative decoding when the daemon has it on (GenerateRequest.speculative)
    # Engine state.
    slot: int | None = None
    cached: int = 0  # tokens of prompt_ids + output_ids whose K/V are in the slot
    output_ids: list[int] = field(default_factory=list)
    started: float | None = None  # clock value when it first got a slot
    first_token_at: float | None = None  # clock value of its first token
    last_token_at: float = 0.0
    cached_prompt_tokens: int = 0
    reprefilled: bool = False
    preemptions: int = 0
    cancel_requested: bool = False  # set from the event loop; honoured at the next step
    cancel_message: str = ""
    failure: str = ""  # set from the event loop with cancel_requested: end with ERROR and this message
    sink_failed: bool = False  # its sink raised: no more token events go to it
    sampler: Sampler | None = None
    text: TextStream | None = None
    pending_chunk: TokenEvent | None = None  # tokens waiting for the stream interval to pass
    last_chunk_at: float | None = None  # clock value of the last chunk handed to the sink
    speculation: SpecState | None = None  # its drafts' index and ledger (daemon/speculative.py), made when first used

    def prefill_target(self) -> int:
        """Tokens that must be in the cache before decoding: the prompt, plus all outputs but the last
        after a preemption (the last sampled token is what the next decode step feeds)."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]


class StageFailure(Exception):
    """One request's own work failed: `stage` names the part, for the request's message."""

    def __init__(self, stage: str, cause: Exception):
        super().__init__(f"{stage} failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause
