"""Request preparation, shared by Generate and Session: a GenerateRequest validated and turned into an engine Sequence.

Text prompts are bounded in bytes before the tokenizer sees them, and tokenizing and chat rendering run in a small
thread pool, never on the event loop. Every problem is a RequestRejected naming what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

from daemon.config import MAX_STREAM_INTERVAL_MS, GenerationConfig, LimitsConfig, StructuredConfig
from daemon.conversation import Conversation
from daemon.sampling import SamplingParams
from daemon.sequence import Priority, Sequence
from daemon.structured_output import GrammarCompiler, GrammarError, GrammarSpec, GrammarState
from daemon.tokenizer import Tokenizer
from daemon.tool_calls import Tool, ToolCallReader, call_grammar, parse_tools
from edgellm.v1 import edgellm_pb2 as pb

log = logging.getLogger("edgellm.server")

# protobuf's Duration range, +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000
# Normalizers (NFC, NFKC) can merge up to 4 bytes of input into one byte ("\U0001d400" -> "A" under NFKC).
NORMALIZER_SLACK = 4
PRIORITIES = {pb.PRIORITY_UNSPECIFIED: Priority.NORMAL, pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
              pb.PRIORITY_NORMAL: Priority.NORMAL, pb.PRIORITY_BACKGROUND: Priority.BACKGROUND}


@dataclass
class RequestRejected(Exception):
    """A request refused before it reached the engine."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None


def internal(what: str, e: BaseException) -> RequestRejected:
    """A failure of the server's own while starting a request, logged, as the INTERNAL status the client gets."""
    log.error("%s failed", what, exc_info=e)
    return RequestRejected(grpc.StatusCode.INTERNAL, f"{what} failed: {type(e).__name__}: {e}")


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def prompt_byte_limit(tokenizer: Tokenizer, max_tokens: int, normalizes: bool) -> int:
    """Bytes beyond which a text cannot tokenize into max_tokens tokens or fewer: max_tokens times the most
    bytes of text one token stands for, times the most a normalizer (if any) can shrink text before it is split."""
    def token_bytes(i: int) -> int:
        # Two upper bounds: the token's string (byte-level and SentencePiece strings are as long as the bytes they
        # stand for, or longer), and its decoded text plus the one leading space a decoder may strip.
        string = tokenizer.id_to_token(i) or ""
        text = tokenizer.decode([i], skip_special_tokens=False)
        return min(utf8_length(string), utf8_length(text) + 1)

    longest = max(map(token_bytes, range(tokenizer.vocab_size)), default=1)
    return max_tokens * max(longest, 1) * (NORMALIZER_SLACK if normalizes else 1)


def has_normalizer(tokenizer_json: Path) -> bool:
    """Whether tokenizer.json normalizes text before splitting it (unknown: assume it does)."""
    try:
        return json.loads(Path(tokenizer_json).read_text(encoding="utf-8")).get("normalizer") is not None
    except (OSError, ValueError, AttributeError):
        return True


def duration_seconds(d: Duration, name: str) -> float:
    """A Duration's seconds, or INVALID_ARGUMENT when it is outside protobuf's rules for the type."""
    same_sign = d.seconds == 0 or d.nanos == 0 or (d.seconds > 0) == (d.nanos > 0)
    if not (abs(d.seconds) <= MAX_DURATION_SECONDS and abs(d.nanos) <= 999_999_999 and same_sign):
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{name} is not a valid Duration (seconds={d.seconds}, nanos={d.nanos}): |seconds| "
                              f"must be at most {MAX_DURATION_SECONDS}, |nanos| below 1e9, both of the same sign")
    return d.seconds + d.nanos / 1e9


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    """Map the API's message to SamplingParams; proto3 zeros mean 'unset' where zero is not valid."""
    params = SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p if p.top_p != 0 else 1.0,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty != 0 else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        logprobs=p.logprobs,
    )
    params.validate()
    return params


def _invalid(message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, message)


def chat_message(m: pb.ChatMessage) -> tuple[str, str] | dict:
    """A chat message as the tokenizer renders it: (role, content), or a dict with its tool call id or calls."""
    if not (m.tool_call_id or m.tool_calls):
        return m.role, m.content
    d = {"role": m.role, "content": m.content}
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
    return d


_GRAMMAR_SYNTAX = {pb.GRAMMAR_SYNTAX_UNSPECIFIED: "lark", pb.GRAMMAR_SYNTAX_LARK: "lark", pb.GRAMMAR_SYNTAX_GBNF: "gbnf"}


def format_spec(f: pb.ResponseFormat) -> GrammarSpec | None:
    """The request's response format as a GrammarSpec (None: unconstrained)."""
    kind = f.WhichOneof("format")
    if kind == "json_schema":
        return GrammarSpec("json_schema", f.json_schema)
    if kind == "json_object":
        return GrammarSpec("json_object", "") if f.json_object else None
    if kind == "regex":
        return GrammarSpec("regex", f.regex)
    if kind == "grammar":
        if f.grammar.syntax not in _GRAMMAR_SYNTAX:
            raise _invalid(f"unknown grammar syntax {f.grammar.syntax}")
        return GrammarSpec(_GRAMMAR_SYNTAX[f.grammar.syntax], f.grammar.text)
    if kind == "choices":
        if not f.choices.choices:
            raise _invalid("response_format.choices has no choices")
        return GrammarSpec("choices", json.dumps(list(f.choices.choices)))
    return None


def structured_bytes(req: pb.GenerateRequest) -> int:
    """The UTF-8 bytes of the request's format and tool definitions (bounded by structured.max_schema_bytes)."""
    f = req.response_format
    n = sum(map(utf8_length, (f.json_schema, f.regex, f.grammar.text, *f.choices.choices)))
    return n + sum(utf8_length(t.name) + utf8_length(t.description) + utf8_length(t.parameters_json_schema)
                   for t in req.tools)


class RequestPreparer:
    """Validates requests against the server's limits and builds their Sequences, with the server's defaults."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, generation: GenerationConfig, limits: LimitsConfig,
                 tokenizer_json: Path, default_stream_interval_ms: int = 0, structured: StructuredConfig | None = None):
        self.tokenizer = tokenizer
        self.structured = structured or StructuredConfig()
        # Read on first need (a request with a format or tools), in the grammar pool: never at start or on the loop.
        self.grammars = GrammarCompiler(tokenizer_json, tokenizer.eos_token_ids, tokenizer.vocab_size,
                                        self.structured.cache_size)
        # One thread: a slow compile holds up other compiles only, never tokenizing.
        self._grammar_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgellm-grammar")
        self.context_length = context_length
        self.generation = generation
        self.limits = limits
        # For requests that leave stream_interval_ms unset; GetModel reports it.
        self.default_stream_interval_ms = default_stream_interval_ms
        self.prompt_token_limit = min(context_length - 1, limits.max_prompt_tokens or context_length)
        # A longer text cannot fit: refused before the tokenizer spends time and memory on it.
        self.max_prompt_bytes = limits.max_prompt_bytes or prompt_byte_limit(
            tokenizer, self.prompt_token_limit, has_normalizer(tokenizer_json))
        # Tokenizing a long prompt or rendering a template is too slow for the event loop (docs/api-errors.md).
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgellm-tokenize")

    async def tokenize(self, text: str) -> list[int]:
        """A text's token ids (the Tokenize RPC), bounded like a text prompt."""
        self._check_size(utf8_length(text), "the text")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, text)

    async def sequence(self, req: pb.GenerateRequest, call_time_left: float | None,
                       conversation: Conversation | None = None) -> Sequence:
        """Validate a request and build its Sequence (for a conversation turn, its prompt is the whole history)."""
        arrival = time.monotonic()
        try:
            sampling = sampling_from_proto(req.sampling)
        except ValueError as e:
            raise _invalid(str(e)) from None
        if req.HasField("max_new_tokens") and req.max_new_tokens <= 0:
            raise _invalid(f"max_new_tokens must be > 0, got {req.max_new_tokens}")
        gen = self.generation
        if len(req.stop) > gen.max_stop_sequences:
            raise _invalid(f"at most {gen.max_stop_sequences} stop sequences, got {len(req.stop)}")
        for s in req.stop:
            if not s or len(s) > gen.max_stop_length:
                # Its length, not its text: the message is logged, and what a request holds is never logged.
                raise _invalid(f"stop sequences must be 1..{gen.max_stop_length} characters, got one of {len(s)}")
        deadline = None
        if req.HasField("deadline"):
            seconds = duration_seconds(req.deadline, "deadline")
            if seconds <= 0:
                raise _invalid(f"deadline must be positive, got {seconds}s")
            deadline = arrival + seconds
        if call_time_left is not None:
            deadline = min(deadline or float("inf"), arrival + call_time_left)
        if req.priority not in PRIORITIES:
            raise _invalid(f"unknown priority {req.priority}")
        interval_ms = req.stream_interval_ms if req.HasField("stream_interval_ms") else self.default_stream_interval_ms
        if interval_ms > MAX_STREAM_INTERVAL_MS:
            raise _invalid(f"stream_interval_ms must be at most {MAX_STREAM_INTERVAL_MS}, got {interval_ms}")
        if (nbytes := structured_bytes(req)) > self.structured.max_schema_bytes:
            raise _invalid(f"the response format and tools have {nbytes} bytes; this server accepts at "
                           f"most {self.structured.max_schema_bytes} (structured.max_schema_bytes)")
        loop = asyncio.get_running_loop()
        tools, spec = [], None
        if req.tools or req.HasField("response_format") or req.HasField("tool_choice"):
            tools, spec = await loop.run_in_executor(self._pool, self._output_format, req)
        grammar = await self._grammar_state(spec) if spec is not None else None
        ids = await loop.run_in_executor(self._pool, self._prompt_ids, req, conversation, tools)
        ctx = self.context_length
        if self.limits.max_prompt_tokens and len(ids) > self.limits.max_prompt_tokens:
            raise _invalid(f"the prompt has {len(ids)} tokens; this server accepts at most {self.limits.max_prompt_tokens} (limits.max_prompt_tokens)")
        if len(ids) >= ctx:
            raise _invalid(f"the prompt has {len(ids)} tokens; the context holds {ctx} (prompt plus at least one new token)")
        if req.HasField("max_new_tokens"):
            max_new = req.max_new_tokens
            if len(ids) + max_new > ctx:
                raise _invalid(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the context of {ctx} tokens")
        else:
            max_new = min(gen.default_max_new_tokens, ctx - len(ids))
        return Sequence(ids, sampling, max_new, tuple(req.stop), req.ignore_eos, deadline, arrival=arrival,
                        priority=PRIORITIES[req.priority], conversation=conversation,
                        stream_interval=interval_ms / 1000, grammar=grammar,
                        tool_calls=ToolCallReader() if tools and self._reads_calls(req) else None,
                        speculative=req.speculative if req.HasField("speculative") else True)

    # ---- the output's format --------------------------------------------------------------------------
    def _output_format(self, req: pb.GenerateRequest) -> tuple[list[Tool], GrammarSpec | None]:
        """The tools shown to the model and the grammar of its reply (in the pool: tool schemas are parsed)."""
        spec = format_spec(req.response_format) if req.HasField("response_format") else None
        choice = req.tool_choice.WhichOneof("choice")
        mode = {pb.TOOL_CHOICE_MODE_UNSPECIFIED: "auto", pb.TOOL_CHOICE_MODE_AUTO: "auto",
                pb.TOOL_CHOICE_MODE_NONE: "none", pb.TOOL_CHOICE_MODE_REQUIRED: "required"}.get(
            req.tool_choice.mode) if choice != "function" else "function"
        if mode is None:
            raise _invalid(f"unknown tool_choice mode {req.tool_choice.mode}")
        if not req.tools:
            if mode in ("required", "function"):
                raise _invalid(f"tool_choice {mode} needs tools")
            return [], spec
        if req.WhichOneof("prompt") != "chat":
            raise _invalid("tools need a chat prompt (the chat template shows them to the model)")
        try:
            tools = parse_tools([(t.name, t.description, t.parameters_json_schema) for t in req.tools])
        except ValueError as e:
            raise _invalid(str(e)) from None
        if mode == "none":  # still shown: the prompt (and a conversation's cached prefix) stays the same
            return tools, spec
        if spec is not None:
            raise _invalid("response_format and tools cannot be combined (set tool_choice none to use the format)")
        callable_tools = tools  # all of them are shown to the model either way: the prompt does not change with the choice
        if mode == "function":
            callable_tools = [t for t in tools if t.name == req.tool_choice.function]
            if not callable_tools:
                raise _invalid(f"tool_choice names {req.tool_choice.function!r}, which is not among the tools")
        return tools, call_grammar(callable_tools, mode)

    @staticmethod
    def _reads_calls(req: pb.GenerateRequest) -> bool:
        return bool(req.tools) and req.tool_choice.mode != pb.TOOL_CHOICE_MODE_NONE

    async def _grammar_state(self, spec: GrammarSpec) -> GrammarState:
        """A state at the start of spec's grammar, compiled (or found in the cache) in the grammar pool."""
        timeout = self.structured.compile_timeout_s
        future = self._grammar_pool.submit(self.grammars.compile, spec)
        try:
            compiled = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            raise _invalid(f"compiling the {spec.describe()} took longer than {timeout:g}s (structured.compile_timeout_s)") from None
        except GrammarError as e:
            raise _invalid(f"invalid {spec.describe()}: {e}") from None
        except Exception as e:
            raise internal(f"compiling the {spec.describe()}", e) from e
        return self.grammars.state(compiled)

    # ---- the prompt (in the pool) -------------------------------------------------------------------
    def _check_size(self, nbytes: int, what: str) -> None:
        if nbytes > self.max_prompt_bytes:
            raise _invalid(f"{what} has {nbytes} bytes; this server accepts at most {self.max_prompt_bytes} "
                           f"(a longer text cannot fit the context; limits.max_prompt_bytes)")

    def _encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except Exception as e:
            raise internal("tokenizing the prompt", e) from e

    def _encode_chat(self, messages: list, tools: list[Tool]) -> list[int]:
        """The chat rendered by the model's template and tokenized; message contents can forge no control token."""
        try:
            return self.tokenizer.encode_chat(messages, tools=tools)
        except ValueError as e:  # the client's messages: an unknown role, what the template refuses
            raise _invalid(str(e)) from None
        except Exception as e:
            raise internal("rendering and tokenizing the chat", e) from e

    def _prompt_ids(self, req: pb.GenerateRequest, conv: Conversation | None, tools: list[Tool] = ()) -> list[int]:
        """The request's prompt as token ids (for a conversation turn: its whole history)."""
        kind = req.WhichOneof("prompt")
        if conv is not None and conv.kind is not None and (kind == "chat") != (conv.kind == "chat"):
            raise _invalid(f"conversation {conv.id!r} takes {'chat' if conv.kind == 'chat' else 'text or token-id'} turns")
        if kind == "text":
            if not req.text:
                raise _invalid("the prompt is empty")
            self._check_size(utf8_length(req.text), "the prompt")
            if conv is not None and conv.history_ids:
                ids = self._encode(req.text)
                if self.tokenizer.add_bos_token and ids[:1] == [self.tokenizer.bos_token_id]:
                    ids = ids[1:]  # a continuation: the BOS is at the start of the history already
                return conv.history_ids + ids
            return self._encode(req.text)
        if kind == "chat":
            if not req.chat.messages:
                raise _invalid("the chat has no messages")
            # A chat template marks every message with at least one token, so more messages than prompt tokens
            # cannot fit; rendering them would hold the GIL for long (docs/api-errors.md, Size limits).
            if len(req.chat.messages) > self.prompt_token_limit:
                raise _invalid(f"the chat has {len(req.chat.messages)} messages; a prompt of at most {self.prompt_token_limit} tokens cannot hold them")
            # The template writes each message's content into the prompt: content this long cannot fit either.
            self._check_size(sum(utf8_length(m.content) + sum(utf8_length(c.arguments) for c in m.tool_calls)
                                 for m in req.chat.messages), "the chat's content")
            earlier = conv.messages if conv is not None else []
            return self._encode_chat([*earlier, *map(chat_message, req.chat.messages)], tools)
        if kind == "token_ids":
            ctx = self.context_length
            if len(req.token_ids.ids) >= ctx:  # before looking at each id: checking millions holds the GIL for long
                raise _invalid(f"the prompt has {len(req.token_ids.ids)} tokens; the context holds {ctx} (prompt plus at least one new token)")
            ids = list(req.token_ids.ids)
            vocab = self.tokenizer.vocab_size
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise _invalid(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
            if not ids:
                raise _invalid("the prompt is empty")
            return conv.history_ids + ids if conv is not None else ids
        raise _invalid("the request has no prompt (set text, chat or token_ids)")
