"""One request from its start until the client has been told how it ended, and the messages it gets for its events."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from daemon.access import Peer
from daemon.conversation import Conversation
from daemon.sequence import FinishEvent, FinishReason, Sequence, TokenEvent
from edgellm.v1 import edgellm_pb2 as pb

_FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
                   FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED, FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
                   FinishReason.ERROR: pb.FINISH_REASON_ERROR}


@dataclass
class Malformed:
    """A request message that did not parse, handed to the handler in place of the message."""

    type_name: str
    error: str

    def describe(self) -> str:
        return f"malformed {self.type_name}: {self.error}"


@dataclass
class Failure:
    """An event of a running request: the server failed handling it (the request ends with `message`)."""

    message: str


@dataclass(eq=False)
class Request:
    """One request from its start until the client has been told how it ended."""

    id: str
    peer: Peer
    out: asyncio.Queue  # the RPC's queue: (Request, TokenEvent | FinishEvent | Failure) pairs
    seq: Sequence | None = None  # set once the engine has it
    conversation: Conversation | None = None  # on a Session: the conversation this request is a turn of
    streamed: bool = False  # tokens went out: a failure now ends it with FINISH_REASON_ERROR, not an error status
    failed: bool = False  # a Failure is on its way to the client; later events only settle the engine's side
    ended: bool = False  # the client has its last message (or is about to)
    settled: bool = False  # the engine is done with it and it is off the live counts

    def response(self, ev: TokenEvent | FinishEvent | Failure) -> tuple[str, Any]:
        """What the client gets for one event: ("tokens" | "finished" | "error", message); updates the state."""
        if isinstance(ev, TokenEvent):
            chunk = token_message(ev)
            self.streamed = True
            return "tokens", chunk
        if isinstance(ev, FinishEvent) and ev.reason is FinishReason.UNAVAILABLE:  # unstarted at a drain: retry elsewhere
            reply = "error", pb.RequestError(code=grpc.StatusCode.UNAVAILABLE.value[0], message=ev.message)
        elif isinstance(ev, FinishEvent):
            reply = "finished", finished_message(ev)
        elif self.streamed:
            reply = "finished", pb.Finished(reason=pb.FINISH_REASON_ERROR, message=ev.message)
        else:
            reply = "error", pb.RequestError(code=grpc.StatusCode.INTERNAL.value[0], message=ev.message)
        self.ended = True
        return reply


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def token_message(ev: TokenEvent) -> pb.TokenChunk:
    chunk = pb.TokenChunk(token_ids=ev.token_ids, text=ev.text,
                          tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in ev.tool_calls])
    for token, logprob, top in ev.logprobs or ():
        chunk.logprobs.append(pb.TokenLogprob(token_id=token, logprob=logprob,
                                              top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top]))
    return chunk


def finished_message(ev: FinishEvent) -> pb.Finished:
    return pb.Finished(
        reason=_FINISH_REASONS[ev.reason], stop_sequence=ev.stop_sequence, message=ev.message,
        usage=pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                       cached_prompt_tokens=ev.cached_prompt_tokens),
        reprefilled=ev.reprefilled, preemptions=ev.preemptions,
        timings=pb.Timings(queue=duration(ev.queue_s), time_to_first_token=duration(ev.ttft_s),
                           total=duration(ev.total_s)))
