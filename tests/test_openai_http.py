"""The OpenAI-compatible HTTP door (daemon/openai_http.py) against a real daemon: the official `openai` package as
the client, and plain HTTP (http.client) for the wire format, access, draining and a client going away."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import ssl
import sys

import openai
import pytest

from conftest import TINY_CONTEXT, DaemonThread, cancel_reached_engine, generate, wait_until
from daemon.config import ConfigError, parse_config
from daemon.openai_http import check_exposure
from edgellm.v1 import edgellm_pb2 as pb

TOKEN = "s3cret-http-token"


def _door_config(sock_dir, **extra) -> dict:
    cfg = {"listen": {"unix": str(sock_dir / "s.sock")}, "engine": {"slots": 4, "max_queued": 8},
           "generation": {"default_max_new_tokens": 16}, "openai": {"listen": "127.0.0.1:0", "model_name": "tiny"}}
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


@pytest.fixture(scope="module")
def door(tiny_bundle, tmp_path_factory):
    d = DaemonThread(tiny_bundle, _door_config(tmp_path_factory.mktemp("sock"))).start()
    yield d
    d.stop()


def client(d: DaemonThread, **kwargs) -> openai.OpenAI:
    kwargs.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=d.daemon.openai.address + "/v1", max_retries=0, timeout=60, **kwargs)


def connect(d: DaemonThread) -> http.client.HTTPConnection:
    host, port = d.daemon.openai.address.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def post(conn: http.client.HTTPConnection, path: str, body, headers=None) -> http.client.HTTPResponse:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    return conn.getresponse()


def sample(d: DaemonThread, reason: str) -> float:
    return d.daemon.metrics.registry.get_sample_value("edgellm_requests_total", {"priority": "normal", "reason": reason}) or 0


def errors(d: DaemonThread, code: str) -> float:
    return d.daemon.metrics.registry.get_sample_value("edgellm_request_errors_total", {"code": code}) or 0


# ---- the openai package ---------------------------------------------------------------------------------
def test_models_lists_the_served_model(door):
    c = client(door)
    assert [m.id for m in c.models.list()] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")


def test_chat_completion(door):
    reply = client(door).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "tiny"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 2
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_uses_the_chat_template_like_grpc(door):
    """The same engine path: the HTTP chat's greedy answer is the gRPC Generate chat's, token for token."""
    messages = [{"role": "user", "content": "the same"}]
    reply = client(door).chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True})
    _, text, finished = generate(door.stub(), chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="the same")]),
                                 max_new_tokens=8, ignore_eos=True)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == finished.usage.prompt_tokens


def test_chat_streaming_gives_the_same_text_and_the_usage(door):
    c = client(door)
    args = dict(model="tiny", messages=[{"role": "user", "content": "stream me"}], max_tokens=12, temperature=0.8, seed=11,
                extra_body={"ignore_eos": True})
    whole = c.chat.completions.create(**args)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_max_tokens_and_greedy_match_grpc(door):
    reply = client(door).completions.create(model="tiny", prompt="once upon", max_tokens=7, temperature=0,
                                            extra_body={"ignore_eos": True})
    ids, text, _ = generate(door.stub(), text="once upon", max_new_tokens=7, ignore_eos=True)
    assert reply.object == "text_completion" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7 == len(ids)
    assert reply.choices[0].text == text


def test_completions_prompt_as_token_ids(door):
    ids, text, _ = generate(door.stub(), token_ids=pb.TokenIds(ids=[5, 6, 7]), max_new_tokens=4, ignore_eos=True)
    reply = client(door).completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert reply.choices[0].text == text and reply.usage.prompt_tokens == 3


def test_completions_streaming(door):
    c = client(door)
    args = dict(model="tiny", prompt="count", max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    whole = c.completions.create(**args).choices[0].text
    chunks = list(c.completions.create(stream=True, **args))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_text(door):
    c = client(door)
    args = dict(model="tiny", prompt="stop test", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = c.completions.create(**args).choices[0].text
    stop = text[5:8]
    assert len(stop) == 3
    cut = c.completions.create(stop=[stop], **args).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    single = c.completions.create(stop=stop, **args).choices[0]  # a string, not a list
    assert single.text == cut.text


def test_same_seed_same_text_and_temperature_is_applied(door):
    c = client(door)
    args = dict(model="tiny", prompt="dice", max_tokens=16, extra_body={"ignore_eos": True})
    a = c.completions.create(temperature=1.5, seed=1234, **args).choices[0].text
    b = c.completions.create(temperature=1.5, seed=1234, **args).choices[0].text
    assert a == b
    # Different seeds at a high temperature: over five seeds, some text differs (the greedy one never would).
    others = {c.completions.create(temperature=1.5, seed=s, **args).choices[0].text for s in range(5)}
    greedy = {c.completions.create(temperature=0, seed=s, **args).choices[0].text for s in range(3)}
    assert len(others) > 1 and len(greedy) == 1


def test_chat_logprobs(door):
    reply = client(door).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "lp"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                                 extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy: the top one


def test_max_tokens_beyond_the_context_is_a_bad_request(door):
    with pytest.raises(openai.BadRequestError) as e:
        client(door).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "long"}],
                                             max_tokens=TINY_CONTEXT * 2)
    assert e.value.status_code == 400
    assert "exceeds the context" in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, expected", [
    ({"n": 2}, "'n' must be 1"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_logprobs": 3}, "'top_logprobs' needs 'logprobs': true"),
    ({"stop": [""]}, "stop sequences must be"),
    ({"presence_penalty": 0.5}, "'presence_penalty' is not supported"),
    ({"logit_bias": {"5": 10}}, "'logit_bias' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "only text parts"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"max_tokens": 0}, "'max_tokens' must be in [1,"),
])
def test_bad_chat_requests_are_refused_with_400(door, extra, expected):
    args = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client(door).chat.completions.create(**args)
    assert expected in e.value.body["message"]


def test_an_unknown_model_is_not_found(door):
    with pytest.raises(openai.NotFoundError) as e:
        client(door).completions.create(model="gpt-4o", prompt="x")
    assert e.value.body["code"] == "model_not_found" and "'tiny'" in e.value.body["message"]


# ---- plain HTTP: the wire ---------------------------------------------------------------------------------
def test_sse_framing(door):
    resp = post(connect(door), "/v1/completions", {"model": "tiny", "prompt": "frame", "max_tokens": 5, "stream": True,
                                                "temperature": 0, "ignore_eos": True})
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and len(chunks) >= 2


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/completions", b"{not json", 400, "invalid_value"),
    ("/v1/completions", [1, 2], 400, "invalid_value"),
    ("/v1/completions", {"model": "tiny"}, 400, "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "invalid_value"),
    ("/v1/nothing", {}, 404, "not_found"),
])
def test_http_errors_have_openai_shape(door, path, body, status, code):
    counted = errors(door, "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT")
    resp = post(connect(door), path, body)
    error = json.loads(resp.read())["error"]
    assert resp.status == status and error["code"] == code
    assert errors(door, "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT") == counted + 1
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_client_going_away_mid_stream_cancels_the_engine_request(door, step_gate):
    gate = step_gate(door)
    cancelled = sample(door, "cancelled")
    gate.hold()
    gate.allow(1)  # admit and prefill: the first token, then the engine waits with the request in its slot
    conn = connect(door)
    # A completion, not a chat: a chat stream sends no chunk for a token without text (the random tiny model's
    # first token may be half a UTF-8 character), and with one step allowed its headers would never come.
    resp = post(conn, "/v1/completions", {"model": "tiny", "prompt": "go on", "max_tokens": TINY_CONTEXT - 40,
                                          "stream": True, "ignore_eos": True})
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    assert len(door.engine.running) == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: cancel_reached_engine(door))
    gate.open()
    assert wait_until(lambda: not door.engine.running and not door.daemon.service.live)
    assert sample(door, "cancelled") == cancelled + 1


def test_client_going_away_while_waiting_for_a_whole_answer_cancels_it(door, step_gate):
    gate = step_gate(door)
    cancelled = sample(door, "cancelled")
    gate.hold()
    conn = connect(door)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "wait", "max_tokens": 50,
                                                         "ignore_eos": True}), {"Content-Type": "application/json"})
    assert wait_until(lambda: door.engine.queue_length == 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: any(seq.cancel_requested for seq in list(door.engine.scheduler.waiting)))
    gate.open()
    assert wait_until(lambda: not door.daemon.service.live)
    assert sample(door, "cancelled") == cancelled + 1


# ---- limits, drain, access --------------------------------------------------------------------------------
def test_full_queue_is_429_with_retry_after(tiny_bundle, tmp_path, step_gate):
    d = DaemonThread(tiny_bundle, _door_config(tmp_path, engine={"slots": 1, "max_queued": 1})).start()
    calls = []
    try:
        gate = step_gate(d)
        gate.hold()
        stub = d.stub()
        calls.append(stub.Generate(pb.GenerateRequest(text="a", max_new_tokens=50, ignore_eos=True), timeout=60))
        assert wait_until(lambda: d.engine.queue_length == 1)
        gate.allow(1)
        assert wait_until(lambda: d.engine.slots_in_use == 1 and d.engine.queue_length == 0)
        calls.append(stub.Generate(pb.GenerateRequest(text="b", max_new_tokens=50, ignore_eos=True), timeout=60))
        assert wait_until(lambda: d.engine.queue_length == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client(d).completions.create(model="tiny", prompt="c", max_tokens=2)
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["type"] == "rate_limit_error" and "retry" in e.value.body["message"]
        for call in calls:
            call.cancel()
        gate.open()
        assert wait_until(lambda: not d.daemon.service.live)
    finally:
        d.stop()


def test_draining_refuses_new_requests_with_503_and_lets_running_ones_finish(tiny_bundle, tmp_path, step_gate):
    d = DaemonThread(tiny_bundle, _door_config(tmp_path)).start()
    try:
        gate = step_gate(d)
        gate.hold()
        gate.allow(1)
        running = connect(d)
        resp = post(running, "/v1/completions", {"model": "tiny", "prompt": "finish me", "max_tokens": 6,
                                                 "stream": True, "temperature": 0, "ignore_eos": True})
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        idle = connect(d)
        idle.request("GET", "/v1/models")  # an open keep-alive connection
        assert idle.getresponse().read()
        drain = asyncio.run_coroutine_threadsafe(d.daemon.drain(30), d.loop)
        assert wait_until(lambda: d.daemon.service.draining)
        late = post(idle, "/v1/completions", {"model": "tiny", "prompt": "too late", "max_tokens": 2})
        assert late.status == 503 and "shutting down" in json.loads(late.read())["error"]["message"]
        with pytest.raises(OSError):  # no new connections
            socket.create_connection(("127.0.0.1", int(d.daemon.openai.address.rsplit(":", 1)[1])), timeout=5)
        gate.open()
        raw = resp.read().decode()
        assert raw.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in raw
        drain.result(30)
    finally:
        d.stop()


@pytest.fixture(scope="module")
def small_door(tiny_bundle, tmp_path_factory):
    d = DaemonThread(tiny_bundle, _door_config(tmp_path_factory.mktemp("sock"),
                                               limits={"max_connections": 1, "max_message_bytes": 1024})).start()
    yield d
    d.stop()


def test_a_body_beyond_max_message_bytes_is_413(small_door):
    conn = connect(small_door)
    resp = post(conn, "/v1/completions", {"model": "tiny", "prompt": "x" * 2000}, {"Connection": "close"})
    error = json.loads(resp.read())["error"]
    assert resp.status == 413 and error["type"] == "invalid_request_error" and "1024" in error["message"]
    conn.close()
    assert wait_until(lambda: not small_door.daemon.openai._runner.server.connections)


def test_connections_beyond_the_bound_are_closed(small_door):
    d = small_door
    first = connect(d)
    first.request("GET", "/v1/models")
    assert first.getresponse().read()  # served, and kept open
    refused = d.daemon.metrics.connections_refused._value.get()
    second = connect(d)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        second.request("GET", "/v1/models")
        second.getresponse().read()
    assert d.daemon.metrics.connections_refused._value.get() == refused + 1
    first.close()
    assert wait_until(lambda: not d.daemon.openai._runner.server.connections)
    third = connect(d)
    third.request("GET", "/v1/models")
    assert third.getresponse().status == 200


@pytest.fixture(scope="module")
def tls_door(tiny_bundle, tmp_path_factory):
    from test_service import _certificates

    folder = tmp_path_factory.mktemp("certs")
    _certificates(folder)
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    d = DaemonThread(tiny_bundle, _door_config(tmp_path_factory.mktemp("sock"), access={
        "tls_cert": str(folder / "server_cert.pem"), "tls_key": str(folder / "server_key.pem"),
        "tls_client_ca": str(folder / "ca.pem"), "token_file": str(token)})).start()
    yield d, folder
    d.stop()


def tls_client(d: DaemonThread, folder, api_key: str, client_cert: bool = True) -> openai.OpenAI:
    port = d.daemon.openai.address.rsplit(":", 1)[1]
    verify = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    if client_cert:  # mutual TLS: the certificate the daemon's CA signed
        verify.load_cert_chain(str(folder / "client_cert.pem"), str(folder / "client_key.pem"))
    return openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key=api_key, max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(verify=verify))


def test_bearer_token_over_tls(tls_door):
    d, folder = tls_door
    assert d.daemon.openai.address.startswith("https://")
    reply = tls_client(d, folder, TOKEN).completions.create(model="tiny", prompt="secure", max_tokens=3,
                                                            extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3


@pytest.mark.parametrize("api_key, code", [("wrong", "invalid_api_key"), ("", "missing_api_key")])
def test_a_missing_or_wrong_token_is_401(tls_door, api_key, code):
    d, folder = tls_door
    c = tls_client(d, folder, api_key or "placeholder")
    headers = {"Authorization": ""} if not api_key else {}
    refused = errors(d, "UNAUTHENTICATED")
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list(extra_headers=headers)
    assert e.value.status_code == 401 and e.value.body["code"] == code
    assert e.value.response.headers["WWW-Authenticate"] == "Bearer"
    assert errors(d, "UNAUTHENTICATED") == refused + 1


def test_mutual_tls_without_a_client_certificate_is_401(tls_door):
    d, folder = tls_door
    with pytest.raises(openai.AuthenticationError) as e:
        tls_client(d, folder, TOKEN, client_cert=False).models.list()
    assert e.value.body["code"] == "client_certificate_required"


def test_plain_http_to_the_tls_port_gets_nothing(tls_door):
    d, _ = tls_door
    port = int(d.daemon.openai.address.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/v1/models")
        conn.getresponse().read()


# ---- configuration -------------------------------------------------------------------------------------
def test_without_aiohttp_the_daemon_stops_before_loading_the_model(tiny_bundle, monkeypatch):
    from bundle_format.bundle import load_bundle
    from daemon import backends, lifecycle

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # `import aiohttp` raises ImportError, as where it is not installed
    monkeypatch.setattr(backends, "create_backend", lambda *a: pytest.fail("the model was loaded"))
    config = parse_config({"listen": {"unix": None, "tcp": "127.0.0.1:0"}, "openai": {"listen": "127.0.0.1:0"}})
    with pytest.raises(ValueError, match=r"openai.listen needs aiohttp: install edgellm's `openai` extra"):
        asyncio.run(lifecycle.run_daemon(config, load_bundle(tiny_bundle)))


def test_config_keys():
    assert parse_config({}).openai.listen is None  # off by default
    assert parse_config({"openai": {"listen": "127.0.0.1:8000"}}).openai.listen == "127.0.0.1:8000"
    with pytest.raises(ConfigError, match="'openai.listen' must be host:port"):
        parse_config({"openai": {"listen": "8000"}})
    with pytest.raises(ConfigError, match="unknown key 'openai.port'"):
        parse_config({"openai": {"port": 8000}})
    with pytest.raises(ConfigError, match="'openai.model_name' must not be empty"):
        parse_config({"openai": {"model_name": " "}})


@pytest.mark.parametrize("access, refused", [
    ({}, "has no TLS (access.tls_cert and access.tls_key) and no client authentication"),
    ({"token_file": "t"}, "access.token_file is set without TLS"),
    ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "has no client authentication"),
    ({"tls_cert": "c.pem", "tls_key": "k.pem", "token_file": "t"}, None),
    ({"tls_cert": "c.pem", "tls_key": "k.pem", "tls_client_ca": "ca.pem"}, None),
])
def test_protected_mode_beyond_loopback(access, refused):
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        if refused:
            with pytest.raises(ValueError, match=re.escape(refused)):
                check_exposure(sock, parse_config({"access": access}))
        else:
            check_exposure(sock, parse_config({"access": access}))
        allowed = parse_config({"access": access})
        allowed.listen.allow_insecure_tcp = True  # listen.allow_insecure_tcp (the gRPC listener's protected mode)
        if refused and "without TLS" in refused:  # a token in clear text: never
            with pytest.raises(ValueError, match=re.escape(refused)):
                check_exposure(sock, allowed)
        else:
            check_exposure(sock, allowed)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        check_exposure(sock, parse_config({"access": access}))
