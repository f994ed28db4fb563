"""Structured output and tool calls through the OpenAI-compatible HTTP door, with the official `openai` package
against a real daemon on a random-weight tiny model: at temperature 1 and whatever the seed, a json_schema reply
validates, a json_object reply parses, a required tool call's arguments validate against its tool's schema, a
streamed reply reassembles into the whole one, and a call's result goes back as a `tool` message."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from conftest import DaemonThread
from daemon.request_prep import chat_message
from daemon.tool_calls import parse_tools
from edgellm.v1 import edgellm_pb2 as pb

SEEDS = range(6)

# Bounded schemas: every valid output is far shorter than the max_tokens given, so the grammar ends them.
SCHEMAS: dict[str, dict] = {
    "flat_object": {"type": "object", "properties": {"zone": {"enum": ["front", "rear"]},
                                                     "celsius": {"type": "integer", "minimum": 16, "maximum": 30}},
                    "required": ["zone", "celsius"], "additionalProperties": False},
    "nested_object": {"type": "object", "properties": {
        "seat": {"type": "object", "properties": {"heat": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0, "maximum": 3}},
                 "required": ["heat", "level"], "additionalProperties": False},
        "row": {"enum": [1, 2]}}, "required": ["seat", "row"], "additionalProperties": False},
    "array_of_objects": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["id"], "additionalProperties": False}},
    "pattern": {"type": "object", "properties": {"plate": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["plate"], "additionalProperties": False},
}

SET_TEMPERATURE = {"type": "function", "function": {
    "name": "set_temperature", "description": "Set the cabin temperature of a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["front", "rear"]},
                                                    "celsius": {"type": "integer", "minimum": 16, "maximum": 30}},
                   "required": ["zone", "celsius"], "additionalProperties": False}}}
OPEN_WINDOW = {"type": "function", "function": {
    "name": "open_window", "description": "Open a window by a percentage",
    "parameters": {"type": "object", "properties": {"percent": {"enum": [0, 50, 100]}},
                   "required": ["percent"], "additionalProperties": False}}}
TOOLS = [SET_TEMPERATURE, OPEN_WINDOW]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CALL_ID = re.compile("call_[0-9a-f]{24}")


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    """The tiny model with a context that holds the tools' system prompt (the tiny tokenizer is close to a
    character per token), serving the OpenAI HTTP API."""
    from build_engine.build import build_bundle
    from tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("openai-tools")
    checkpoint = make_tiny_checkpoint(root / "ckpt", "llama", max_position_embeddings=2048)
    bundle = build_bundle(checkpoint, root / "bundle", context_length=1536)
    d = DaemonThread(bundle, {"listen": {"unix": str(root / "s.sock")}, "engine": {"slots": 2},
                              "openai": {"listen": "127.0.0.1:0", "model_name": "tiny"}}).start()
    yield d
    d.stop()


@pytest.fixture()
def client(door) -> openai.OpenAI:
    return openai.OpenAI(base_url=door.daemon.openai.address + "/v1", api_key="unused", max_retries=0, timeout=120)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# ---- response_format ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_replies_validate(client, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "settings?"}],
                                               response_format=json_schema_format(schema), temperature=1.0, seed=seed,
                                               max_tokens=120)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.message.tool_calls is None


def test_json_schema_on_completions_and_streamed(client):
    schema = SCHEMAS["flat_object"]
    for seed in SEEDS[:3]:
        reply = client.completions.create(model="tiny", prompt="the setting:", extra_body={"response_format": json_schema_format(schema)},
                                          temperature=1.0, seed=seed, max_tokens=120)
        jsonschema.validate(json.loads(reply.choices[0].text), schema)
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "settings?"}], response_format=json_schema_format(schema),
            temperature=1.0, seed=seed, max_tokens=120, stream=True))
        jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), schema)
        assert chunks[-1].choices[0].finish_reason == "stop"


class Cabin(pydantic.BaseModel):
    zone: Literal["front", "rear"]
    celsius: int = pydantic.Field(ge=16, le=30)


def test_the_openai_parse_helper_gets_a_valid_object(client):
    """client.chat.completions.parse sends the pydantic model as a strict json_schema and parses the reply."""
    for seed in SEEDS[:3]:
        reply = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "cabin?"}],
                                              response_format=Cabin, temperature=1.0, seed=seed, max_tokens=120)
        parsed = reply.choices[0].message.parsed
        assert isinstance(parsed, Cabin) and 16 <= parsed.celsius <= 30


def test_json_object_replies_parse(client):
    for seed in SEEDS:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}],
                                               response_format={"type": "json_object"}, temperature=1.0, seed=seed,
                                               max_tokens=120)
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # an unbounded object may run out of tokens: what there is, is the start of an object
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_a_text_format_is_unconstrained(client):
    args = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=1.0, seed=3, max_tokens=12)
    plain = client.chat.completions.create(**args)
    assert client.chat.completions.create(response_format={"type": "text"}, **args).choices[0].message.content == \
        plain.choices[0].message.content


def test_a_malformed_schema_is_a_bad_request_with_the_engines_message(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format=json_schema_format({"type": "strin"}))
    assert e.value.body["code"] == "invalid_argument" and e.value.body["type"] == "invalid_request_error"
    assert "invalid json schema" in e.value.body["message"].lower() and "strin" in e.value.body["message"]


# ---- tools ------------------------------------------------------------------------------------------------
def ask(client: openai.OpenAI, seed: int, **kwargs):
    kwargs.setdefault("messages", [{"role": "user", "content": "warmer in the back"}])
    kwargs.setdefault("max_tokens", 300)
    return client.chat.completions.create(model="tiny", tools=TOOLS, temperature=1.0, seed=seed, **kwargs)


def reassemble(chunks) -> tuple[str | None, list[dict], str]:
    """A streamed reply's (content, tool calls, finish_reason), the deltas put together as OpenAI's clients do."""
    content, calls, finish = None, {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content is not None:
            content = (content or "") + delta.content
        for d in delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
            call["id"] = d.id or call["id"]
            call["type"] = d.type or call["type"]
            call["function"]["name"] += d.function.name or ""
            call["function"]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))  # indexes 0, 1, ... in order
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_tool_choice_calls_a_tool_whole_and_streamed(client):
    finished_with_calls = 0
    for seed in SEEDS:
        whole = ask(client, seed, tool_choice="required").choices[0]
        streamed = reassemble(ask(client, seed, tool_choice="required", stream=True))
        calls = [c.model_dump(exclude_none=True) for c in whole.message.tool_calls or ()]
        # The same seed gives the same reply: streamed, it reassembles into the whole one (ids are per reply).
        assert streamed[0] == whole.message.content and streamed[2] == whole.finish_reason
        assert [{**c, "id": None} for c in streamed[1]] == [{**c, "id": None} for c in calls]
        if whole.finish_reason == "length":
            continue  # a random model may chain calls until the budget; each completed call is still checked below
        finished_with_calls += 1
        assert whole.finish_reason == "tool_calls" and whole.message.content is None and calls
        for call in [*calls, *streamed[1]]:
            assert CALL_ID.fullmatch(call["id"]) and call["type"] == "function"
            jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL_SCHEMAS[call["function"]["name"]])
    assert finished_with_calls


def test_a_named_tool_choice_calls_exactly_that_function(client):
    for seed in SEEDS[:3]:
        choice = ask(client, seed, tool_choice={"type": "function", "function": {"name": "open_window"}},
                     parallel_tool_calls=False).choices[0]
        assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == ["open_window"]
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), TOOL_SCHEMAS["open_window"])


def test_auto_tool_choice_gives_text_or_calls(client):
    for seed in SEEDS:
        choice = ask(client, seed, max_tokens=60).choices[0]
        if choice.message.tool_calls:
            assert choice.message.content is None
        else:
            assert "<tool_call>" not in choice.message.content and choice.finish_reason != "tool_calls"


def test_a_tool_result_goes_back_as_a_tool_message(client, door):
    """Turn 1 calls a tool; turn 2 sends the call and its result (a `tool` message with the call's id): the
    prompt the engine gets is the whole exchange, as the gRPC API renders it, and the answer is text."""
    user = {"role": "user", "content": "make it warmer in the back"}
    first = ask(client, 5, messages=[user], tool_choice={"type": "function", "function": {"name": "set_temperature"}})
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    messages = [user, first.choices[0].message.model_dump(exclude_none=True),  # as clients send it back
                {"role": "tool", "tool_call_id": call.id, "content": '{"ok": true}'}]
    second = ask(client, 5, messages=messages, tool_choice="none", max_tokens=8)
    assert second.choices[0].message.tool_calls is None and isinstance(second.choices[0].message.content, str)
    history = [("user", user["content"]),
               chat_message(pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id=call.id, name=call.function.name,
                                                                                      arguments=call.function.arguments)])),
               chat_message(pb.ChatMessage(role="tool", tool_call_id=call.id, content='{"ok": true}'))]
    tools = parse_tools([(t["function"]["name"], t["function"]["description"], json.dumps(t["function"]["parameters"]))
                         for t in TOOLS])
    tok = door.daemon.service.preparer.tokenizer
    assert second.usage.prompt_tokens == len(tok.encode_chat(history, tools=tools))
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments)


@pytest.mark.parametrize("extra, expected", [
    ({"response_format": {"type": "xml"}}, "'response_format' must be"),
    ({"response_format": {"type": "json_schema"}}, "'response_format.json_schema' must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}}, "must be a JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}},
     "'response_format.json_schema.name' must be a string"),
    ({"tools": {"name": "f"}}, "'tools' must be a list"),
    ({"tools": [{"type": "function", "function": {"description": "d"}}]}, "'tools[0].function.name' is required"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "'tools[0].function.parameters' must be a JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tool name 'bad name!'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "'tool_choice' must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "'fly', which is not among the tools"),
    ({"tool_choice": "required"}, "tool_choice required needs tools"),
    ({"tools": TOOLS, "parallel_tool_calls": False}, "'parallel_tool_calls': false"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"functions": [{"name": "f"}]}, "'functions' is not supported by this server (use 'tools'"),
    ({"messages": [{"role": "tool", "content": "2"}]}, "'messages[0].tool_call_id' is required"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
     "only assistant messages make tool calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "'messages[0].tool_calls[0]' must be"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": "f", "arguments": "{nope"}}]}]},
     "arguments is not valid JSON"),
])
def test_bad_formats_and_tools_are_bad_requests(client, extra, expected):
    args = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert expected in e.value.body["message"]


def test_tools_on_completions_are_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"tools": TOOLS})
    assert "'tools' needs a chat" in e.value.body["message"]
