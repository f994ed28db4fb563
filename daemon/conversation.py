"""A conversation of a Session stream: its KV cache in the engine and its history on the server, in one object.

Two threads share it and each field has one writer. The engine thread owns the cache fields (`slot`, `tokens`,
`busy`, `evicted`, `last_used`); the event loop owns `close_requested` (the engine reads it at its next step) and
the history (`kind`, `messages`, `history_ids`, `turn`). The tokenizer pool reads the history while it renders a
turn's prompt; the event loop changes the history only when no turn is being prepared or running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Turn:
    """The turn in progress: one request of the conversation, from its start until the client has its end."""

    request_id: str
    messages: list[tuple[str, str] | dict[str, Any]]  # a chat turn: the messages it adds (the reply is appended when it ends)
    reply_text: list[str] = field(default_factory=list)  # what was streamed to the client
    reply_ids: list[int] = field(default_factory=list)
    reply_calls: list[dict[str, Any]] = field(default_factory=list)  # tool calls streamed (as chat templates take them)


@dataclass(eq=False)
class Conversation:
    """The engine keeps `tokens` in `slot` between turns; the server keeps the history each turn's prompt repeats."""

    id: str
    # The cache (engine thread): `tokens` are the ids whose K/V sit in positions [0, len) of `slot`.
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    busy: bool = False  # a turn holds the slot
    evicted: bool = False  # lost its cache since the last turn
    last_used: float = 0.0
    # Set by the event loop, honoured by the engine thread: release the cache (now, or when the running turn ends).
    close_requested: bool = False
    # The history (event loop), of the turns that were answered.
    kind: str | None = None  # "chat" or "raw" (text / token ids): fixed by the first turn the engine took
    # chat: every message, replies included: (role, content), or a dict where tool calls or a tool result are in it
    messages: list[tuple[str, str] | dict[str, Any]] = field(default_factory=list, repr=False)
    history_ids: list[int] = field(default_factory=list, repr=False)  # raw: every token, prompts and outputs
    turn: Turn | None = field(default=None, repr=False)

    def begin_turn(self, request_id: str, messages: list[tuple[str, str] | dict[str, Any]]) -> None:
        """Reserve the conversation for one turn (the caller has checked that none is running)."""
        self.turn = Turn(request_id, messages)

    def abandon_turn(self, request_id: str) -> None:
        """The turn never reached the engine: the conversation is as it was before it."""
        if self.turn is not None and self.turn.request_id == request_id:
            self.turn = None

    def turn_queued(self, kind: str) -> None:
        """The engine has the running turn: the first such turn fixes the conversation's kind."""
        self.kind = self.kind or kind

    def record_reply(self, text: str, token_ids: list[int], tool_calls: list[dict[str, Any]] = ()) -> None:
        """A chunk of the running turn's reply went to the client (tool_calls: as chat templates take them)."""
        self.turn.reply_text.append(text)
        self.turn.reply_ids += token_ids
        self.turn.reply_calls += tool_calls

    def end_turn(self, answered: bool, prompt_ids: list[int], output_ids: list[int] | None) -> None:
        """The client has the turn's end. An answered turn joins the history: for a chat its messages and the
        streamed reply, for a raw conversation the prompt and `output_ids` (every token the engine generated, which
        is what its cache holds; None when the engine may still be running the request: the streamed tokens).
        A turn that ended before any token (failed, or refused at a drain) leaves the history as it was."""
        turn, self.turn = self.turn, None
        if not answered:
            return
        if self.kind == "chat":
            text = "".join(turn.reply_text)
            reply = {"role": "assistant", "content": text, "tool_calls": turn.reply_calls} if turn.reply_calls else ("assistant", text)
            self.messages = [*self.messages, *turn.messages, reply]
        else:
            self.history_ids = [*prompt_ids, *(turn.reply_ids if output_ids is None else output_ids)]
