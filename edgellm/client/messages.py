"""Requests built from plain Python values, and what comes back: chunks of tokens and a final result."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from google.protobuf.duration_pb2 import Duration

from edgellm.client.errors import EdgeLLMError, status_code
from edgellm.v1 import edgellm_pb2 as pb

# A prompt: text, token ids, chat messages as (role, content) pairs or {"role", "content"} dicts, or a
# ready GenerateRequest (sent as is: the keyword options must then be left out).
Prompt = Union[str, Sequence[int], Sequence[tuple[str, str]], Sequence[Mapping[str, str]], pb.GenerateRequest]

PRIORITIES = {"interactive": pb.PRIORITY_INTERACTIVE, "normal": pb.PRIORITY_NORMAL,
              "background": pb.PRIORITY_BACKGROUND}


def _chat(messages: Sequence) -> pb.ChatMessages:
    out = pb.ChatMessages()
    for m in messages:
        if not isinstance(m, Mapping):
            out.messages.add(role=m[0], content=m[1])
            continue
        msg = out.messages.add(role=m["role"], content=m.get("content", ""), tool_call_id=m.get("tool_call_id", ""))
        for call in m.get("tool_calls", ()):  # an assistant turn's calls, as Chunk.tool_calls gave them
            msg.tool_calls.add().CopyFrom(call if isinstance(call, pb.ToolCall) else pb.ToolCall(**call))
    return out


def make_request(prompt: Prompt, *, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 0.0,
                 seed: int | None = None, logprobs: int = 0, stop: Sequence[str] = (), ignore_eos: bool = False,
                 deadline: float | None = None, priority: str | None = None,
                 stream_interval_ms: int | None = None, cache_salt: str = "",
                 json_schema: Mapping | str | None = None, response_format: pb.ResponseFormat | None = None,
                 tools: Sequence[Mapping] = (), tool_choice: str | None = None,
                 speculative: bool | None = None) -> pb.GenerateRequest:
    """A GenerateRequest. deadline: seconds the server gives the request from its arrival (it then ends with
    finish reason "deadline", keeping what streamed); priority: "interactive", "normal" or "background";
    cache_salt: the prefix cache's scope (docs/prefix-cache.md); json_schema (a dict or JSON text) or
    response_format: the output's format; tools: {"name", "description", "parameters" (a JSON schema)} dicts,
    tool_choice: "auto", "none", "required" or a tool's name (docs/structured-output.md); speculative: False opts
    out of speculative decoding (docs/speculative.md)."""
    if isinstance(prompt, pb.GenerateRequest):
        return prompt
    req = pb.GenerateRequest(max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos,
                             stream_interval_ms=stream_interval_ms,
                             sampling=pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                                        repetition_penalty=repetition_penalty, seed=seed,
                                                        logprobs=logprobs),
                             cache_salt=cache_salt, speculative=speculative)
    if json_schema is not None:
        response_format = pb.ResponseFormat(
            json_schema=json_schema if isinstance(json_schema, str) else json.dumps(json_schema))
    if response_format is not None:
        req.response_format.CopyFrom(response_format)
    for tool in tools:
        req.tools.add(name=tool["name"], description=tool.get("description", ""),
                      parameters_json_schema=json.dumps(tool["parameters"]) if "parameters" in tool else "")
    if tool_choice is not None:
        modes = {"auto": pb.TOOL_CHOICE_MODE_AUTO, "none": pb.TOOL_CHOICE_MODE_NONE,
                 "required": pb.TOOL_CHOICE_MODE_REQUIRED}
        if tool_choice in modes:
            req.tool_choice.mode = modes[tool_choice]
        else:
            req.tool_choice.function = tool_choice
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and all(isinstance(t, int) for t in prompt):
        req.token_ids.ids.extend(prompt)
    else:
        req.chat.CopyFrom(_chat(prompt))
    if deadline is not None:
        d = Duration()
        d.FromNanoseconds(int(deadline * 1e9))
        req.deadline.CopyFrom(d)
    if priority is not None:
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        req.priority = PRIORITIES[priority]
    return req


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens that arrived together: their ids, the text they add (whole characters; may be empty), when
    asked for one edgellm.v1.TokenLogprob per token (its logprob and the top alternatives), and the tool calls
    they completed (edgellm.v1.ToolCall: id, name, arguments as JSON text)."""

    text: str
    token_ids: Sequence[int]
    logprobs: Sequence[pb.TokenLogprob] = ()
    tool_calls: Sequence[pb.ToolCall] = ()

    @classmethod
    def of(cls, m: pb.TokenChunk) -> "Chunk":
        return cls(m.text, m.token_ids, m.logprobs, m.tool_calls)


@dataclass(frozen=True)
class Result:
    """How a request ended. finish_reason: "stop", "length", "cancelled", "deadline" or "error"."""

    finish_reason: str
    stop_sequence: str
    message: str  # why, when the reason alone does not say (e.g. the server shut down; the failure for "error")
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # reused from the conversation's earlier turns
    queue_s: float  # arrival to prefill start, on the server
    time_to_first_token_s: float
    total_s: float
    reprefilled: bool
    preemptions: int
    attempts: int  # sends it took, retries included

    @classmethod
    def of(cls, f: pb.Finished, attempts: int) -> "Result":
        t = f.timings
        return cls(pb.FinishReason.Name(f.reason).removeprefix("FINISH_REASON_").lower(), f.stop_sequence, f.message,
                   f.usage.prompt_tokens, f.usage.completion_tokens, f.usage.cached_prompt_tokens,
                   t.queue.ToNanoseconds() / 1e9, t.time_to_first_token.ToNanoseconds() / 1e9,
                   t.total.ToNanoseconds() / 1e9, f.reprefilled, f.preemptions, attempts)


@dataclass(frozen=True)
class Completion:
    """A whole answer (Client.complete): its text, its token ids, its tool calls and how it ended."""

    text: str
    token_ids: list[int]
    result: Result
    tool_calls: list[pb.ToolCall]

    @classmethod
    def of(cls, chunks: Sequence[Chunk], result: Result) -> "Completion":
        return cls("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], result,
                   [call for c in chunks for call in c.tool_calls])


def session_reply(msg: pb.SessionResponse, attempts: int) -> "Chunk | Result | EdgeLLMError":
    """What one Session message for a request says: its next tokens, how it ended, or the error that ended its
    start (nothing streamed before an error: the protocol's rule)."""
    kind = msg.WhichOneof("kind")
    if kind == "tokens":
        return Chunk.of(msg.tokens)
    if kind == "finished":
        return Result.of(msg.finished, attempts)
    e = msg.error
    return EdgeLLMError(status_code(e.code), e.message,
                        e.retry_after.ToNanoseconds() / 1e9 if e.HasField("retry_after") else None)

