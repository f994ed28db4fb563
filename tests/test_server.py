"""The gRPC API against a real daemon (Unix socket and loopback TCP, ONNX Runtime on the tiny model)."""

from __future__ import annotations

import queue
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import TINY_CONTEXT, DaemonThread, StepGate, cancel_reached_engine, generate, wait_until
from daemon.backend_onnx import create_cpu_backend
from daemon.thread_placement import allowed_cpus
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

FR = pb.FinishReason


class SessionClient:
    """Drives one Session stream: requests go in through a queue, responses are read on demand."""

    def __init__(self, stub):
        self._out: queue.Queue = queue.Queue()
        self.responses = stub.Session(iter(self._out.get, None), timeout=60)

    def start(self, rid: str, **fields) -> None:
        self._out.put(pb.SessionRequest(start=pb.StartRequest(id=rid, request=pb.GenerateRequest(**fields))))

    def cancel(self, rid: str) -> None:
        self._out.put(pb.SessionRequest(cancel=pb.CancelRequest(id=rid)))

    def close(self) -> None:
        self._out.put(None)

    def next(self) -> pb.SessionResponse:
        return next(self.responses)


def test_get_model_describes_the_bundle(daemon):
    info = daemon.stub().GetModel(pb.GetModelRequest(), timeout=10)
    assert info.architecture == "llama"
    assert info.backend == "onnxruntime-cpu"
    assert info.context_length == TINY_CONTEXT
    assert info.slots == 4
    assert info.bundle_id == daemon.bundle.bundle_id
    # 4 slots x K and V x 2 layers x 2 kv heads x 129 positions (context 128 + a scratch one) x head_dim 16 x 4 bytes.
    assert info.kv_cache_bytes == 4 * 2 * 2 * 2 * 129 * 16 * 4 == 264_192


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_generate_streams_tokens(daemon, transport):
    address = daemon.daemon.addresses[0 if transport == "unix" else 1]
    assert address.startswith("unix:") == (transport == "unix")
    ids, text, finished = generate(daemon.stub(address), text="hello world", max_new_tokens=12, ignore_eos=True)
    assert len(ids) == 12
    assert finished.reason == FR.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 12
    assert finished.usage.prompt_tokens == len(daemon.daemon.tokenizer.encode("hello world"))
    assert text == daemon.daemon.tokenizer.decode(ids)
    assert finished.timings.total.ToNanoseconds() >= finished.timings.time_to_first_token.ToNanoseconds() > 0


def test_same_seed_same_tokens(daemon):
    stub = daemon.stub()
    sampling = pb.SamplingParams(temperature=1.0, top_k=50, seed=1234)
    a, _, _ = generate(stub, text="one two", max_new_tokens=16, ignore_eos=True, sampling=sampling)
    b, _, _ = generate(stub, text="one two", max_new_tokens=16, ignore_eos=True, sampling=sampling)
    sampling.seed = 99
    c, _, _ = generate(stub, text="one two", max_new_tokens=16, ignore_eos=True, sampling=sampling)
    assert a == b
    assert a != c


def test_token_ids_prompt_and_tokenize_agree(daemon):
    stub = daemon.stub()
    ids = list(stub.Tokenize(pb.TokenizeRequest(text="the quick fox"), timeout=10).ids)
    assert ids
    by_text, _, _ = generate(stub, text="the quick fox", max_new_tokens=8, ignore_eos=True)
    by_ids, _, _ = generate(stub, token_ids=pb.TokenIds(ids=ids), max_new_tokens=8, ignore_eos=True)
    assert by_text == by_ids


def test_logprobs_are_returned_when_asked(daemon):
    stub = daemon.stub()
    msgs = list(stub.Generate(pb.GenerateRequest(text="abc", max_new_tokens=3, ignore_eos=True,
                                                 sampling=pb.SamplingParams(logprobs=2)), timeout=30))
    chunks = [m.tokens for m in msgs if m.HasField("tokens") and m.tokens.token_ids]
    assert chunks
    for c in chunks:
        assert [lp.token_id for lp in c.logprobs] == list(c.token_ids)
        assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in c.logprobs)


def test_stream_interval_sends_fewer_chunks_with_the_same_tokens(daemon):
    stub = daemon.stub()
    each, each_text, _ = generate(stub, text="count with me", max_new_tokens=12, ignore_eos=True)
    msgs = list(stub.Generate(pb.GenerateRequest(text="count with me", max_new_tokens=12, ignore_eos=True,
                                                 stream_interval_ms=1000, sampling=pb.SamplingParams(logprobs=1)),
                              timeout=30))
    chunks = [list(m.tokens.token_ids) for m in msgs if m.HasField("tokens")]
    assert [t for c in chunks for t in c] == each
    for m in msgs[:-1]:  # one logprob entry per token of its chunk
        assert [lp.token_id for lp in m.tokens.logprobs] == list(m.tokens.token_ids)
    assert "".join(m.tokens.text for m in msgs if m.HasField("tokens")) == each_text
    assert len(chunks[0]) == 1 and len(chunks) < len(each)  # the first token at once, the rest batched
    assert msgs[-1].finished.usage.completion_tokens == 12


def test_stream_interval_default_comes_from_the_server_and_zero_overrides_it(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")},
                                   "generation": {"stream_interval_ms": 1000}}).start()
    try:
        stub = d.stub()
        assert stub.GetModel(pb.GetModelRequest()).stream_interval_ms == 1000  # the server's default, as reported

        def chunks(**fields):
            return [m for m in stub.Generate(pb.GenerateRequest(text="abc", max_new_tokens=8, ignore_eos=True, **fields),
                                             timeout=30) if m.HasField("tokens")]

        assert len(chunks()) < 8  # unset: the server's 1000 ms
        assert len(chunks(stream_interval_ms=0)) == 8  # an explicit 0: every token at once
    finally:
        d.stop()


# A step on every allowed CPU: 25 ms chunks; on one thread with CPUs to spare: every token at once.
@pytest.mark.parametrize("threads, expected", [(len(allowed_cpus()), 25),
                                               pytest.param(1, 0, marks=pytest.mark.skipif(
                                                   len(allowed_cpus()) == 1, reason="one CPU: one thread fills it"))])
def test_auto_stream_interval_follows_the_backend_threads(tiny_bundle, tmp_path, threads, expected):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}, "generation": {"stream_interval_ms": "auto"}},
                     backend=lambda bundle, cfg: create_cpu_backend(bundle, cfg.engine.slots, threads=threads)).start()
    try:
        stub = d.stub()
        assert stub.GetModel(pb.GetModelRequest()).stream_interval_ms == expected
        assert d.daemon.service.preparer.default_stream_interval_ms == expected
        msgs = [m for m in stub.Generate(pb.GenerateRequest(text="abc", max_new_tokens=40, ignore_eos=True), timeout=30)
                if m.HasField("tokens")]
        assert sum(len(m.tokens.token_ids) for m in msgs) == 40
        if expected:  # the step fills every CPU: batched by default
            assert len(msgs) < 40
        else:
            assert len(msgs) == 40
    finally:
        d.stop()


def test_session_concurrent_requests_with_one_cancelled(daemon, gate):
    stub = daemon.stub()
    alone = {}
    for rid, prompt in (("a", "first prompt"), ("c", "third one here")):
        alone[rid], _, _ = generate(stub, text=prompt, max_new_tokens=24, ignore_eos=True)
    gate.hold()
    s = SessionClient(stub)
    s.start("a", text="first prompt", max_new_tokens=24, ignore_eos=True)
    s.start("b", text="second", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True)
    s.start("c", text="third one here", max_new_tokens=24, ignore_eos=True)
    assert wait_until(lambda: daemon.engine.queue_length == 3)
    # Step 1 admits all three and prefills a, 2 prefills b, 3 prefills c, 4 decodes all: b has 3 tokens.
    gate.allow(4)
    tokens = {"a": [], "b": [], "c": []}
    finished = {}
    cancelled_sent = False
    while len(finished) < 3:
        msg = s.next()
        kind = msg.WhichOneof("kind")
        assert kind != "error", msg
        if kind == "tokens":
            tokens[msg.id] += msg.tokens.token_ids
            if msg.id == "b" and len(tokens["b"]) >= 3 and not cancelled_sent:
                s.cancel("b")
                cancelled_sent = True
                assert wait_until(lambda: cancel_reached_engine(daemon))
                gate.open()
        else:
            finished[msg.id] = msg.finished
    s.close()
    assert list(s.responses) == []  # the stream ends once its requests are done and the client closed
    assert finished["b"].reason == FR.FINISH_REASON_CANCELLED
    assert 3 <= len(tokens["b"]) < TINY_CONTEXT - 8
    for rid in ("a", "c"):
        assert finished[rid].reason == FR.FINISH_REASON_LENGTH
        assert tokens[rid] == alone[rid]  # batching with others changes nothing (greedy)
    assert wait_until(lambda: daemon.engine.slots_in_use == 0)


BAD_REQUESTS = {
    "empty prompt": dict(text=""),
    "no prompt": dict(),
    "max_new_tokens zero": dict(text="hi", max_new_tokens=0),
    "max_new_tokens negative": dict(text="hi", max_new_tokens=-5),
    "temperature negative": dict(text="hi", sampling=pb.SamplingParams(temperature=-0.5)),
    "top_p above one": dict(text="hi", sampling=pb.SamplingParams(top_p=1.5)),
    "top_p negative": dict(text="hi", sampling=pb.SamplingParams(top_p=-0.1)),
    "prompt longer than context": dict(token_ids=pb.TokenIds(ids=[5] * (TINY_CONTEXT + 10))),
    "prompt plus max_new_tokens beyond context": dict(text="hi", max_new_tokens=TINY_CONTEXT),
    "token id outside vocabulary": dict(token_ids=pb.TokenIds(ids=[10**6])),
    "unknown chat role": dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="hi")])),
    "empty stop sequence": dict(text="hi", stop=[""]),
    "negative deadline": dict(text="hi", deadline=Duration(seconds=-1)),
    "stream interval above a second": dict(text="hi", stream_interval_ms=1001),
    **{f"{name} {value}": dict(text="hi", sampling=pb.SamplingParams(**{name: value}))
       for name, values in {"temperature": (float("inf"), float("nan"), 1e30, 101.0),
                            "repetition_penalty": (float("inf"), float("nan"), 1e30, -1.0),
                            "top_p": (float("inf"), float("nan")), "min_p": (float("inf"), float("nan"), -0.1)}.items()
       for value in values},
    "deadline nanos out of range": dict(text="hi", deadline=Duration(nanos=2_000_000_000)),
    "deadline seconds out of range": dict(text="hi", deadline=Duration(seconds=10**12)),
    "deadline with mixed signs": dict(text="hi", deadline=Duration(seconds=5, nanos=-1)),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_generate_rejects_bad_input(daemon, name):
    stub = daemon.stub()
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, **BAD_REQUESTS[name])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()


def test_session_bad_inputs_end_only_that_request(daemon):
    stub = daemon.stub()
    s = SessionClient(stub)
    s.start("long", text="keep going", max_new_tokens=40, ignore_eos=True)
    s.start("long", text="a duplicate id", max_new_tokens=4)  # while the first "long" still runs
    for i, fields in enumerate(BAD_REQUESTS.values()):
        s.start(f"bad{i}", **fields)
    s.cancel("nobody")
    errors, refused, finished = {}, {}, {}
    while "long" not in finished or "nobody" not in refused:
        msg = s.next()
        if msg.WhichOneof("kind") == "error":
            errors.setdefault(msg.id, []).append(msg.error)
        elif msg.WhichOneof("kind") == "refused":
            assert msg.id == ""  # a refused message is never addressed as a request
            refused[msg.refused.id] = msg.refused
        elif msg.WhichOneof("kind") == "finished":
            finished[msg.id] = msg.finished
    for i in range(len(BAD_REQUESTS)):
        (e,) = errors[f"bad{i}"]
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and e.message
    assert "long" not in errors  # the duplicate start is refused; the running "long" goes on
    assert refused["long"].kind == pb.SESSION_REQUEST_KIND_START and "duplicate" in refused["long"].message
    assert refused["long"].code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert refused["nobody"].kind == pb.SESSION_REQUEST_KIND_CANCEL
    assert refused["nobody"].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert finished["long"].reason == FR.FINISH_REASON_LENGTH
    assert finished["long"].usage.completion_tokens == 40
    # The same stream still serves new requests.
    s.start("after", text="still here", max_new_tokens=3, ignore_eos=True)
    while (msg := s.next()).WhichOneof("kind") != "finished":
        assert msg.WhichOneof("kind") == "tokens"
    assert msg.id == "after" and msg.finished.reason == FR.FINISH_REASON_LENGTH
    s.close()


def test_chat_messages_use_the_chat_template(daemon):
    tok = daemon.daemon.tokenizer
    chat = [("system", "be brief"), ("user", "hello")]
    expected = tok.encode(tok.render_chat(chat))
    _, _, finished = generate(daemon.stub(), chat=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in chat]),
                              max_new_tokens=2, ignore_eos=True)
    assert finished.usage.prompt_tokens == len(expected)


def test_deadline_passed_in_queue_is_shed(daemon):
    _, _, finished = generate(daemon.stub(), text="late", max_new_tokens=5, deadline=Duration(nanos=1))
    assert finished.reason == FR.FINISH_REASON_DEADLINE
    assert finished.usage.completion_tokens == 0


def test_client_going_away_frees_its_slot(daemon, gate):
    stub = daemon.stub()
    gate.hold()
    gate.allow(1)  # admit and prefill: the first token, then the engine waits with the request in its slot
    call = stub.Generate(pb.GenerateRequest(text="go on", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True), timeout=60)
    first = next(call)
    assert first.HasField("tokens")
    assert daemon.engine.slots_in_use >= 1
    call.cancel()
    assert wait_until(lambda: cancel_reached_engine(daemon))
    gate.open()
    assert wait_until(lambda: daemon.engine.slots_in_use == 0 and not daemon.engine.running)


def test_stop_sequence_ends_generation_without_leaking(daemon):
    stub = daemon.stub()
    _, text, _ = generate(stub, text="stop test", max_new_tokens=30, ignore_eos=True)
    stop = text[5:8]
    assert len(stop) == 3
    _, cut, finished = generate(stub, text="stop test", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert finished.reason == FR.FINISH_REASON_STOP
    assert finished.stop_sequence == stop
    assert cut == text[:text.index(stop)]


def test_health_and_reflection(daemon):
    channel = grpc.insecure_channel(daemon.daemon.addresses[0])
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="edgellm.v1.Inference"), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in resp.list_services_response.service}
    assert {"edgellm.v1.Inference", "grpc.health.v1.Health"} <= names


def fill_slots_and_queue(daemon, gate: StepGate, s: SessionClient, n: int) -> None:
    """Start n long requests on one session; one engine step admits as many as there are slots, and the
    engine then waits at the gate with the slots full and the rest queued."""
    gate.hold()
    for i in range(n):
        s.start(f"r{i}", text="fill", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True)
    assert wait_until(lambda: daemon.engine.queue_length == n)
    gate.allow(1)
    assert wait_until(lambda: daemon.engine.slots_in_use == 4 and daemon.engine.queue_length == n - 4)


def test_queue_bound_answers_resource_exhausted(daemon, gate):
    """Fill the 4 slots and the 8-deep queue, then one more is refused with RESOURCE_EXHAUSTED."""
    stub = daemon.stub()
    s = SessionClient(stub)
    n = 4 + 8
    fill_slots_and_queue(daemon, gate, s, n)
    s.start("one-too-many", text="fill", max_new_tokens=4)
    while (msg := s.next()).WhichOneof("kind") != "error":
        pass
    assert msg.id == "one-too-many"
    assert msg.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    for i in range(n):
        s.cancel(f"r{i}")
    gate.open()
    s.close()
    reasons = [m.finished.reason for m in s.responses if m.WhichOneof("kind") == "finished"]
    assert len(reasons) == n and set(reasons) <= {FR.FINISH_REASON_CANCELLED, FR.FINISH_REASON_LENGTH}
    assert wait_until(lambda: daemon.engine.slots_in_use == 0 and daemon.engine.queue_length == 0)


def test_queue_full_error_carries_a_retry_hint(daemon, gate):
    stub = daemon.stub()
    s = SessionClient(stub)
    fill_slots_and_queue(daemon, gate, s, 4 + 8)
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, text="no room", max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry" in err.value.details()
    assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) >= 100
    for i in range(12):
        s.cancel(f"r{i}")
    gate.open()
    s.close()
    assert len([m for m in s.responses if m.WhichOneof("kind") == "finished"]) == 12


def test_seeded_sampling_is_unchanged_by_batching(daemon):
    stub = daemon.stub()
    sampling = pb.SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    alone = [generate(stub, text=p, max_new_tokens=20, ignore_eos=True, sampling=sampling)[0] for p in prompts]
    s = SessionClient(stub)
    for i, p in enumerate(prompts):
        s.start(str(i), text=p, max_new_tokens=20, ignore_eos=True, sampling=sampling)
    s.close()
    together = {str(i): [] for i in range(3)}
    for msg in s.responses:
        if msg.WhichOneof("kind") == "tokens":
            together[msg.id] += msg.tokens.token_ids
    assert [together[str(i)] for i in range(3)] == alone


def test_interactive_request_overtakes_background_work(daemon, gate):
    stub = daemon.stub()
    s = SessionClient(stub)
    gate.hold()
    for i in range(4):  # every slot busy with long background requests
        s.start(f"bg{i}", text="background job", max_new_tokens=TINY_CONTEXT - 16, ignore_eos=True,
                priority=pb.PRIORITY_BACKGROUND)
    assert wait_until(lambda: daemon.engine.queue_length == 4)
    gate.allow(4)  # admit all four, prefill each: all of them are generating
    started = set()
    while len(started) < 4:
        msg = s.next()
        assert msg.WhichOneof("kind") == "tokens", msg
        if msg.WhichOneof("kind") == "tokens":
            started.add(msg.id)
    s.start("now", text="urgent", max_new_tokens=4, ignore_eos=True, priority=pb.PRIORITY_INTERACTIVE)
    assert wait_until(lambda: daemon.engine.queue_length == 1)
    gate.open()
    s.close()
    order = [m.id for m in s.responses if m.WhichOneof("kind") == "finished"]
    assert order[0] == "now"  # it finished before any background request
    assert sorted(order[1:]) == ["bg0", "bg1", "bg2", "bg3"]  # and none of those was dropped


def test_deadline_while_generating_keeps_streamed_text(daemon, gate):
    stub = daemon.stub()
    s = SessionClient(stub)
    gate.hold()
    gate.allow(1)  # the first token; then the engine waits until the deadline has passed
    s.start("d", text="take your time", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True,
            deadline=Duration(nanos=20_000_000))
    first = s.next()
    first_at = time.monotonic()  # after the request reached the server, so past its deadline 20 ms on
    assert wait_until(lambda: time.monotonic() > first_at + 0.02)
    gate.open()
    s.close()
    msgs = [first, *s.responses]
    tokens = sum(len(m.tokens.token_ids) for m in msgs if m.WhichOneof("kind") == "tokens")
    (fin,) = [m.finished for m in msgs if m.WhichOneof("kind") == "finished"]
    assert fin.reason == FR.FINISH_REASON_DEADLINE
    assert fin.usage.completion_tokens == tokens < TINY_CONTEXT - 8
    assert wait_until(lambda: daemon.engine.slots_in_use == 0)


def run_turn(s: SessionClient, rid: str, conversation: str, **fields) -> tuple[list[int], pb.Finished]:
    s._out.put(pb.SessionRequest(start=pb.StartRequest(id=rid, conversation_id=conversation,
                                                       request=pb.GenerateRequest(**fields))))
    ids = []
    while True:
        msg = s.next()
        assert msg.id == rid and msg.WhichOneof("kind") != "error", msg
        if msg.WhichOneof("kind") == "tokens":
            ids += msg.tokens.token_ids
        else:
            return ids, msg.finished


def test_conversation_turns_reuse_the_cache(daemon):
    stub = daemon.stub()
    s = SessionClient(stub)
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="c1")))
    first = [11, 12, 13, 14, 15]
    out1, f1 = run_turn(s, "t1", "c1", token_ids=pb.TokenIds(ids=first), max_new_tokens=6, ignore_eos=True)
    assert f1.usage.cached_prompt_tokens == 0
    out2, f2 = run_turn(s, "t2", "c1", token_ids=pb.TokenIds(ids=[21, 22]), max_new_tokens=6, ignore_eos=True)
    history = first + out1 + [21, 22]
    assert f2.usage.prompt_tokens == len(history)
    assert f2.usage.cached_prompt_tokens == len(first) + len(out1) - 1  # only the new tokens were prefilled
    assert not f2.reprefilled
    # The same history sent as a plain request gives the same tokens: the reused cache is right.
    plain, _, _ = generate(stub, token_ids=pb.TokenIds(ids=history), max_new_tokens=6, ignore_eos=True)
    assert out2 == plain
    assert daemon.engine.slots_in_use == 1  # the idle conversation holds its slot
    s._out.put(pb.SessionRequest(close_conversation=pb.CloseConversation(id="c1")))
    s.close()
    assert list(s.responses) == []
    assert wait_until(lambda: daemon.engine.slots_in_use == 0)


def test_chat_conversation_prefills_only_the_new_turn(daemon):
    s = SessionClient(daemon.stub())
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="chat")))
    msg = lambda text: pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)])  # noqa: E731
    _, f1 = run_turn(s, "q1", "chat", chat=msg("hello there"), max_new_tokens=5, ignore_eos=True)
    _, f2 = run_turn(s, "q2", "chat", chat=msg("and then?"), max_new_tokens=5, ignore_eos=True)
    assert f2.usage.prompt_tokens > f1.usage.prompt_tokens
    assert f2.usage.cached_prompt_tokens >= f1.usage.prompt_tokens  # the first turn's prompt was not prefilled again
    s.close()  # the conversation ends with its stream
    assert list(s.responses) == []
    assert wait_until(lambda: daemon.engine.slots_in_use == 0)


def test_a_chat_conversation_keeps_the_answered_turns_only(daemon):
    """Turns refused before they ran leave no trace: the next turn's prompt is the answered turns' messages, the
    streamed replies included, plus its own, exactly as a plain request with those messages renders it."""
    stub = daemon.stub()
    s = SessionClient(stub)
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="chat")))
    user = lambda text: pb.ChatMessage(role="user", content=text)  # noqa: E731

    def turn(rid: str, *messages: pb.ChatMessage, **fields) -> tuple[str, pb.SessionResponse]:
        s._out.put(pb.SessionRequest(start=pb.StartRequest(id=rid, conversation_id="chat", request=pb.GenerateRequest(
            chat=pb.ChatMessages(messages=messages), **fields))))
        text = ""
        while (msg := s.next()).WhichOneof("kind") == "tokens":
            text += msg.tokens.text
        assert msg.id == rid
        return text, msg

    reply, end = turn("q1", user("hello there"), max_new_tokens=5, ignore_eos=True)
    assert end.finished.reason == FR.FINISH_REASON_LENGTH
    _, end = turn("too-long", user("forget me"), max_new_tokens=TINY_CONTEXT)  # refused after rendering
    assert end.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "exceeds the context" in end.error.message
    s._out.put(pb.SessionRequest(start=pb.StartRequest(id="raw", conversation_id="chat",
                                                       request=pb.GenerateRequest(text="plain text"))))
    end = s.next()
    assert end.id == "raw" and end.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "takes chat turns" in end.error.message
    _, end = turn("q2", user("and then?"), max_new_tokens=1)
    history = [user("hello there"), pb.ChatMessage(role="assistant", content=reply), user("and then?")]
    _, _, plain = generate(stub, chat=pb.ChatMessages(messages=history), max_new_tokens=1)
    assert end.finished.usage.prompt_tokens == plain.usage.prompt_tokens
    assert end.finished.usage.cached_prompt_tokens > 0  # the conversation's cache served the answered turn
    s.close()
    assert list(s.responses) == []


def test_conversation_errors(daemon):
    s = SessionClient(daemon.stub())
    s.start("x", text="hi", max_new_tokens=2)
    s._out.put(pb.SessionRequest(start=pb.StartRequest(id="y", conversation_id="missing",
                                                       request=pb.GenerateRequest(text="hi"))))
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="c")))
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="c")))
    s._out.put(pb.SessionRequest(close_conversation=pb.CloseConversation(id="nope")))
    s.close()
    msgs = list(s.responses)
    errors = {m.id: m.error.code for m in msgs if m.WhichOneof("kind") == "error"}
    refused = {(m.refused.kind, m.refused.id): m.refused.code for m in msgs if m.WhichOneof("kind") == "refused"}
    assert errors == {"y": grpc.StatusCode.NOT_FOUND.value[0]}  # the request "y" ended: its conversation is unknown
    assert refused == {(pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION, "c"): grpc.StatusCode.ALREADY_EXISTS.value[0],
                       (pb.SESSION_REQUEST_KIND_CLOSE_CONVERSATION, "nope"): grpc.StatusCode.NOT_FOUND.value[0]}


def test_slow_reader_is_cut_off_without_stalling_the_engine(tiny_bundle, tmp_path):
    sock = tmp_path / "slow.sock"
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(sock)}, "engine": {"slots": 2},
                                   "generation": {"max_buffered_chunks": 48}}).start()
    try:
        # A tiny HTTP/2 window: the server soon cannot write, so undelivered chunks pile up on its side.
        channel = grpc.insecure_channel(f"unix:{sock}", options=[("grpc.http2.lookahead_bytes", 256),
                                                                 ("grpc.http2.bdp_probe", 0)])
        slow = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(text="x", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True), timeout=30)
        assert next(slow).HasField("tokens")
        assert wait_until(lambda: not d.engine.running)  # ended while the client was not reading
        # Meanwhile another client is served normally.
        ids, _, fin = generate(d.stub(), text="fast", max_new_tokens=20, ignore_eos=True)
        assert len(ids) == 20 and fin.reason == FR.FINISH_REASON_LENGTH
        rest = list(slow)
        fin = rest[-1].finished
        assert fin.reason == FR.FINISH_REASON_CANCELLED
        assert "did not read" in fin.message
        assert fin.usage.completion_tokens < TINY_CONTEXT - 8
    finally:
        d.stop()
