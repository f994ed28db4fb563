"""The gRPC API against a real daemon (Unix socket and loopback TCP, ONNX Runtime on the tiny model)."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import TINY_CONTEXT, wait_until
from edgellm.v1 import edgellm_pb2 as pb

FR = pb.FinishReason


def generate(stub, **fields) -> tuple[list[int], str, pb.Finished]:
    ids, text, finished = [], "", None
    for msg in stub.Generate(pb.GenerateRequest(**fields), timeout=60):
        if msg.HasField("tokens"):
            ids += msg.tokens.token_ids
            text += msg.tokens.text
        else:
            finished = msg.finished
    return ids, text, finished


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
    assert info.kv_cache_bytes == daemon.daemon.backend.kv_cache_bytes > 0


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


def test_session_concurrent_requests_with_one_cancelled(daemon):
    stub = daemon.stub()
    alone = {}
    for rid, prompt in (("a", "first prompt"), ("c", "third one here")):
        alone[rid], _, _ = generate(stub, text=prompt, max_new_tokens=24, ignore_eos=True)
    s = SessionClient(stub)
    s.start("a", text="first prompt", max_new_tokens=24, ignore_eos=True)
    s.start("b", text="second", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True)
    s.start("c", text="third one here", max_new_tokens=24, ignore_eos=True)
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
    for i, fields in enumerate(BAD_REQUESTS.values()):
        s.start(f"bad{i}", **fields)
    s.start("long", text="a duplicate id", max_new_tokens=4)
    s.cancel("nobody")
    errors, finished = {}, {}
    while "long" not in finished:
        msg = s.next()
        if msg.WhichOneof("kind") == "error":
            errors.setdefault(msg.id, []).append(msg.error)
        elif msg.WhichOneof("kind") == "finished":
            finished[msg.id] = msg.finished
    for i in range(len(BAD_REQUESTS)):
        (e,) = errors[f"bad{i}"]
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and e.message
    assert "duplicate" in errors["long"][0].message
    assert errors["nobody"][0].code == grpc.StatusCode.NOT_FOUND.value[0]
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


def test_client_going_away_frees_its_slot(daemon):
    stub = daemon.stub()
    call = stub.Generate(pb.GenerateRequest(text="go on", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True), timeout=60)
    first = next(call)
    assert first.HasField("tokens")
    assert daemon.engine.slots_in_use >= 1
    call.cancel()
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


def test_queue_bound_answers_resource_exhausted(daemon):
    """Fill the 4 slots and the 8-deep queue, then one more is refused with RESOURCE_EXHAUSTED."""
    stub = daemon.stub()
    s = SessionClient(stub)
    n = 4 + 8
    for i in range(n):
        s.start(f"r{i}", text="fill", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True)
    assert wait_until(lambda: daemon.engine.slots_in_use + daemon.engine.queue_length == n)
    s.start("one-too-many", text="fill", max_new_tokens=4)
    while (msg := s.next()).WhichOneof("kind") != "error":
        pass
    assert msg.id == "one-too-many"
    assert msg.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    for i in range(n):
        s.cancel(f"r{i}")
    s.close()
    reasons = [m.finished.reason for m in s.responses if m.WhichOneof("kind") == "finished"]
    assert len(reasons) == n and set(reasons) <= {FR.FINISH_REASON_CANCELLED, FR.FINISH_REASON_LENGTH}
    assert wait_until(lambda: daemon.engine.slots_in_use == 0 and daemon.engine.queue_length == 0)
