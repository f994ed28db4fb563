"""Tool calls: the grammar that makes a reply text or calls, the system-prompt fallback, and reading calls back.

A call is written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the form Hermes/Qwen-style templates
train on); several calls follow each other on separate lines. The grammar allows exactly that, with each tool's
argument schema, or (tool choice auto) text whose first character is neither "<" nor a blank. The reader decides from the reply's
first character which it is, and turns each closed call into a ToolCall; the call markup never reaches `text`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.structured_output import JSON_OPTIONS, GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # the JSON schema of its arguments object

    def as_template_tool(self) -> dict[str, Any]:
        """The tool as Hugging Face chat templates take it (the `tools` variable)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


def parse_tools(entries: Sequence[tuple[str, str, str]]) -> list[Tool]:
    """(name, description, parameters JSON text) -> Tools; ValueError naming what is wrong."""
    tools, seen = [], set()
    for name, description, schema_text in entries:
        if not TOOL_NAME.fullmatch(name):
            raise ValueError(f"tool name {name!r} must be 1..64 characters of A-Z a-z 0-9 _ . -")
        if name in seen:
            raise ValueError(f"tool {name!r} is defined twice")
        seen.add(name)
        try:
            schema = json.loads(schema_text) if schema_text else {"type": "object"}
        except ValueError as e:
            raise ValueError(f"tool {name!r}: parameters_json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"tool {name!r}: parameters_json_schema must be a JSON object (a schema)")
        tools.append(Tool(name, description, schema))
    return tools


def call_grammar(tools: Sequence[Tool], mode: str) -> GrammarSpec:
    """The grammar of a reply: mode "auto" text or calls, "required" one or more calls, "function" exactly one."""
    def call_schema(t: Tool) -> dict[str, Any]:
        # The arguments schema must describe an object: anything else could not be a call's arguments.
        return {"type": "object", "properties": {"name": {"const": t.name}, "arguments": {**t.parameters, "type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}

    schemas = [call_schema(t) for t in tools]
    schema = {**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": JSON_OPTIONS}
    lines = [f'call: "{OPEN}" %json {json.dumps(schema)} "{CLOSE}"']
    if mode == "auto":
        # Text starts with a visible character other than "<": blanks first would let call markup pass as text.
        lines += ["start: TEXT | calls", 'calls: call ("\\n" call)*', r"TEXT: /[^<\s](.|\n)*/"]
    elif mode == "required":
        lines += ["start: calls", 'calls: call ("\\n" call)*']
    else:
        lines += ["start: call"]
    return GrammarSpec("lark", "\n".join(reversed(lines)), what="tool definitions")


def fallback_prompt(tools: Sequence[Tool]) -> str:
    """The system-prompt text that describes the tools to a model whose chat template has no `tools` support."""
    listed = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                  ensure_ascii=False) for t in tools)
    return ("You can call these functions (each with the JSON schema of its arguments):\n" + listed + "\n"
            f'To call a function, reply with only {OPEN}{{"name": <function name>, "arguments": {{...}}}}{CLOSE}, '
            "one line per call; its result comes back in a message from the tool role. Otherwise reply with text.")


def markup(name: str, arguments: Any) -> str:
    """A call as the model writes it."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return OPEN + json.dumps({"name": name, "arguments": args}, ensure_ascii=False, separators=(",", ":")) + CLOSE


def fallback_messages(chat: list[dict[str, Any]], tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """chat for a template without tools support: the tools in the system message, calls back into their markup."""
    out = []
    for m in chat:
        calls = m.get("tool_calls")
        if calls:
            written = "\n".join(markup(c["function"]["name"], c["function"]["arguments"]) for c in calls)
            m = {**m, "content": f"{m.get('content') or ''}{written}"}
        out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{fallback_prompt(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": fallback_prompt(tools)})
    return out


def template_call(call: ToolCall | Mapping[str, Any]) -> dict[str, Any]:
    """A call as Hugging Face chat templates take it (assistant message's tool_calls)."""
    if isinstance(call, ToolCall):
        call = {"id": call.id, "name": call.name, "arguments": call.arguments}
    elif "function" in call:  # already in the template's form
        return dict(call)
    args = call["arguments"]
    try:
        args = json.loads(args) if isinstance(args, str) and args else (args or {})
    except ValueError:
        raise ValueError(f"tool call {call['name']!r}: arguments is not valid JSON") from None
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": args}}


class ToolCallReader:
    """Splits a reply's streamed text into text for the client and completed ToolCalls."""

    def __init__(self) -> None:
        self.mode: str | None = None  # "text" or "calls", once the first character is known
        self._buf = ""  # calls mode: the markup not yet closed

    def read(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """(text for the client, calls completed) for the next piece of the reply; final: the reply has ended."""
        if self.mode is None and delta:
            self.mode = "calls" if delta.startswith("<") else "text"
        if self.mode != "calls":
            return delta, []
        self._buf += delta
        calls = []
        while (end := self._buf.find(CLOSE)) >= 0:
            body = self._buf[self._buf.index(OPEN) + len(OPEN):end]
            self._buf = self._buf[end + len(CLOSE):].lstrip("\n")
            call = json.loads(body)
            calls.append(ToolCall(f"call_{secrets.token_hex(12)}", call["name"],
                                  json.dumps(call["arguments"], ensure_ascii=False)))
        if final and self._buf:  # cut short (max_new_tokens): what there is goes out as text, not lost
            rest, self._buf = self._buf.lstrip("\n"), ""
            return rest, calls
        return "", calls
