"""Where bytes become requests: oversized and malformed input, the Session message contract, failures while
one request is handled, and the gRPC call's own deadline and end -- against a real daemon."""

from __future__ import annotations

import logging
import queue
import threading

import grpc
import pytest

from conftest import TINY_CONTEXT, DaemonThread, generate, wait_until
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc
from test_server import SessionClient, fill_slots_and_queue

FR = pb.FinishReason
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
# A string field 1 holding bytes that are not UTF-8: GenerateRequest.text, TokenizeRequest.text, StartRequest.id.
BAD_UTF8_FIELD = b"\x0a\x02\xff\xfe"


def drained(d: DaemonThread) -> bool:
    """Nothing left behind: no slot in use, nothing queued, no request on the books."""
    return d.engine.slots_in_use == 0 and d.engine.queue_length == 0 and not d.daemon.service.live


def read_until_finished(s: SessionClient, ids: set[str]) -> dict[str, list[pb.SessionResponse]]:
    """Every message until each id in ids has its end (finished or error), by id ("" for refused)."""
    by_id: dict[str, list[pb.SessionResponse]] = {}
    ended: set[str] = set()
    while not ids <= ended:
        msg = s.next()
        by_id.setdefault(msg.id, []).append(msg)
        if msg.WhichOneof("kind") in ("finished", "error"):
            ended.add(msg.id)
    return by_id


# ---- oversized text ----------------------------------------------------------------------------------
def test_oversized_text_is_refused_before_tokenizing(daemon, monkeypatch):
    preparer = daemon.daemon.service.preparer
    tok = preparer.tokenizer
    # The tiny byte-level tokenizer has no normalizer: each token stands for at most its decoded bytes.
    longest = max(len(tok.decode([i], skip_special_tokens=False).encode()) for i in range(tok.vocab_size))
    assert (TINY_CONTEXT - 1) * longest <= preparer.max_prompt_bytes <= (TINY_CONTEXT - 1) * (longest + 1)
    encoded: list[int] = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: encoded.append(len(text)) or encode(text))
    huge = "hello world " * (2_000_000 // 12)
    stub = daemon.stub()
    for fields in (dict(text=huge), dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=huge)]))):
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limits.max_prompt_bytes" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(pb.TokenizeRequest(text=huge), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_bytes" in err.value.details()
    assert all(n <= preparer.max_prompt_bytes for n in encoded)  # the tokenizer never saw the huge text
    # Just within the bound is not refused for its size (its token count decides).
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, text="x" * preparer.max_prompt_bytes, max_new_tokens=1)
    assert "tokens" in err.value.details() and "max_prompt_bytes" not in err.value.details()


def test_oversized_token_id_prompt_is_refused_before_its_ids_are_read(daemon):
    ids = [5] * 3_000_000 + [10**6]  # one id outside the vocabulary, at the end
    with pytest.raises(grpc.RpcError) as err:
        generate(daemon.stub(), token_ids=pb.TokenIds(ids=ids))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the context holds" in err.value.details()  # refused for its length, not for the id


def test_chat_of_more_messages_than_tokens_is_refused_before_rendering(daemon, monkeypatch):
    tok = daemon.daemon.tokenizer
    rendered: list[int] = []
    encode_chat = tok.encode_chat
    monkeypatch.setattr(tok, "encode_chat", lambda messages: rendered.append(len(messages)) or encode_chat(messages))
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="")] * 100_000)
    with pytest.raises(grpc.RpcError) as err:
        generate(daemon.stub(), chat=chat)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "100000 messages" in err.value.details()
    assert rendered == []


def test_max_prompt_bytes_setting(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")}, "limits": {"max_prompt_bytes": 40}}).start()
    try:
        stub = d.stub()
        _, _, fin = generate(stub, text="a" * 40, max_new_tokens=1)
        assert fin.reason == FR.FINISH_REASON_LENGTH
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, text="a" * 41, max_new_tokens=1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 40" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # multi-byte characters count as their UTF-8 bytes
            generate(stub, text="é" * 21, max_new_tokens=1)
        assert "42 bytes" in err.value.details()
    finally:
        d.stop()


def test_tokenizing_a_long_text_does_not_stall_other_clients(tiny_bundle, tmp_path, monkeypatch):
    """While a 6 MB text is being tokenized, GetModel answers and another request streams tokens."""
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")},
                                   "limits": {"max_prompt_bytes": 16 * 1024 * 1024}}).start()
    try:
        tok = d.daemon.tokenizer
        encode = tok.encode
        started, done = threading.Event(), threading.Event()

        def watched_encode(text: str) -> list[int]:
            big = len(text) > 1_000_000
            if big:
                started.set()
            try:
                return encode(text)
            finally:
                if big:
                    done.set()

        monkeypatch.setattr(tok, "encode", watched_encode)
        stub = d.stub()
        outcome: list = []

        def send_huge() -> None:
            try:
                generate(stub, text="The quick brown fox jumps. " * (6_000_000 // 27))
            except grpc.RpcError as e:
                outcome.append(e.code())

        big = threading.Thread(target=send_huge)
        big.start()
        assert started.wait(30)
        assert stub.GetModel(pb.GetModelRequest(), timeout=30).context_length == TINY_CONTEXT
        model_answered_while_tokenizing = not done.is_set()
        tokens_while_tokenizing = 0
        for msg in stub.Generate(pb.GenerateRequest(text="meanwhile", max_new_tokens=20, ignore_eos=True), timeout=30):
            if msg.HasField("tokens") and not done.is_set():
                tokens_while_tokenizing += len(msg.tokens.token_ids)
        big.join(60)
        assert model_answered_while_tokenizing
        assert tokens_while_tokenizing > 0
        assert outcome == [grpc.StatusCode.INVALID_ARGUMENT]  # far more tokens than the context holds
    finally:
        d.stop()


# ---- malformed messages --------------------------------------------------------------------------------
def test_malformed_session_message_fails_the_stream(daemon):
    channel = grpc.insecure_channel(daemon.daemon.addresses[0])
    session = channel.stream_stream("/edgellm.v1.Inference/Session")  # bytes in, bytes out
    sent: queue.Queue = queue.Queue()
    start = lambda rid: pb.SessionRequest(start=pb.StartRequest(  # noqa: E731
        id=rid, request=pb.GenerateRequest(text="go", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True))).SerializeToString()
    sent.put(start("first"))
    responses = session(iter(sent.get, None), timeout=60)  # the client never half-closes
    assert pb.SessionResponse.FromString(next(responses)).id == "first"
    sent.put(b"\x0a" + bytes([len(BAD_UTF8_FIELD)]) + BAD_UTF8_FIELD)  # a start whose id is not UTF-8
    sent.put(start("later"))
    with pytest.raises(grpc.RpcError) as err:
        for raw in responses:
            assert pb.SessionResponse.FromString(raw).id == "first"  # "later" is never started
    sent.put(None)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed edgellm.v1.SessionRequest" in err.value.details()
    assert wait_until(lambda: drained(daemon))  # "first" was cancelled with its stream


def test_malformed_unary_requests_are_invalid_argument_and_logged_once(daemon, caplog):
    channel = grpc.insecure_channel(daemon.daemon.addresses[0])
    calls = [channel.unary_stream("/edgellm.v1.Inference/Generate"),
             channel.unary_unary("/edgellm.v1.Inference/Tokenize"),
             channel.unary_unary("/edgellm.v1.Inference/GetModel")]
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    result = call(BAD_UTF8_FIELD if call is not calls[2] else b"\xff\xff\xff", timeout=10)
                    list(result) if call is calls[0] else result
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "malformed edgellm.v1." in err.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1
    assert daemon.stub().GetModel(pb.GetModelRequest(), timeout=10).context_length == TINY_CONTEXT


# ---- the Session message contract -------------------------------------------------------------------------
def test_refused_messages_never_address_the_live_request_of_that_id(daemon, gate):
    s = SessionClient(daemon.stub())
    gate.hold()
    gate.allow(1)
    s.start("a", text="first", max_new_tokens=12, ignore_eos=True)
    assert s.next().id == "a"  # a runs
    s.start("a", text="again", max_new_tokens=4)  # a duplicate of the running a
    s.cancel("x")  # no such request: then a start with that id
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="a")))
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="a")))  # already open: refused
    s._out.put(pb.SessionRequest())
    s.start("x", text="second", max_new_tokens=3, ignore_eos=True)
    assert wait_until(lambda: daemon.engine.queue_length == 1)
    gate.open()
    by_id = read_until_finished(s, {"a", "x"})
    s.close()
    for rid, n in (("a", 12), ("x", 3)):
        kinds = [m.WhichOneof("kind") for m in by_id[rid]]
        assert kinds == ["tokens"] * (len(kinds) - 1) + ["finished"], kinds
        assert by_id[rid][-1].finished.usage.completion_tokens == n
    refused = [(m.refused.kind, m.refused.id, m.refused.code) for m in by_id[""]]
    assert refused == [(pb.SESSION_REQUEST_KIND_START, "a", grpc.StatusCode.ALREADY_EXISTS.value[0]),
                       (pb.SESSION_REQUEST_KIND_CANCEL, "x", grpc.StatusCode.NOT_FOUND.value[0]),
                       (pb.SESSION_REQUEST_KIND_OPEN_CONVERSATION, "a", grpc.StatusCode.ALREADY_EXISTS.value[0]),
                       (pb.SESSION_REQUEST_KIND_UNSPECIFIED, "", grpc.StatusCode.INVALID_ARGUMENT.value[0])]
    assert list(s.responses) == []


# ---- failures while one request is handled ------------------------------------------------------------------
def _failing_for(marker: str, real):
    """real, except that it raises RuntimeError("injected") when called with something containing marker."""
    def wrapped(*args, **kwargs):
        if marker in repr(args):
            raise RuntimeError("injected")
        return real(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("where, what", [("tokenize", "tokenizing the prompt"),
                                         ("render", "rendering and tokenizing the chat"),
                                         ("submit", "queueing the request in the engine")])
def test_a_failure_while_starting_ends_only_that_request(daemon, monkeypatch, where, what):
    tok, engine = daemon.daemon.tokenizer, daemon.engine
    if where == "tokenize":
        monkeypatch.setattr(tok, "encode", _failing_for("explode", tok.encode))
    elif where == "render":
        monkeypatch.setattr(tok, "encode_chat", _failing_for("explode", tok.encode_chat))
    else:
        doomed, submit = tok.encode("explode"), engine.submit

        def failing_submit(seq) -> None:
            if seq.prompt_ids == doomed:
                raise RuntimeError("injected")
            submit(seq)

        monkeypatch.setattr(engine, "submit", failing_submit)
    bad = (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="explode")])) if where == "render"
           else dict(text="explode"))
    stub = daemon.stub()
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, max_new_tokens=4, **bad)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == f"{what} failed: RuntimeError: injected"
    s = SessionClient(stub)
    s.start("good", text="fine", max_new_tokens=5, ignore_eos=True)
    s.start("bad", max_new_tokens=4, **bad)
    s.start("after", text="still fine", max_new_tokens=5, ignore_eos=True)
    by_id = read_until_finished(s, {"good", "bad", "after"})
    s.close()
    (err_msg,) = by_id["bad"]
    assert err_msg.error.code == INTERNAL and err_msg.error.message == f"{what} failed: RuntimeError: injected"
    for rid in ("good", "after"):
        assert by_id[rid][-1].finished.reason == FR.FINISH_REASON_LENGTH
    assert list(s.responses) == []
    assert wait_until(lambda: drained(daemon))


@pytest.mark.parametrize("after_tokens", [0, 3])
def test_a_failure_handing_events_to_the_stream_ends_only_that_request(daemon, monkeypatch, after_tokens):
    service = daemon.daemon.service
    hand_off = service._hand_off
    seen: dict[str, int] = {}

    def failing_hand_off(request, ev):
        seen[request.id] = seen.get(request.id, 0) + 1
        if request.id == "bad" or (request.id.startswith("generate-") and after_tokens == 0):
            if seen[request.id] > after_tokens:
                raise RuntimeError("injected")
        hand_off(request, ev)

    monkeypatch.setattr(service, "_hand_off", failing_hand_off)
    message = "handing the engine's output to the stream failed: RuntimeError: injected"
    s = SessionClient(daemon.stub())
    s.start("bad", text="doomed", max_new_tokens=30, ignore_eos=True)
    s.start("good", text="fine", max_new_tokens=30, ignore_eos=True)
    by_id = read_until_finished(s, {"bad", "good"})
    end = by_id["bad"][-1]
    if after_tokens:
        assert [m.WhichOneof("kind") for m in by_id["bad"]] == ["tokens"] * after_tokens + ["finished"]
        assert end.finished.reason == FR.FINISH_REASON_ERROR and end.finished.message == message
    else:
        assert [m.WhichOneof("kind") for m in by_id["bad"]] == ["error"]
        assert end.error.code == INTERNAL and end.error.message == message
        with pytest.raises(grpc.RpcError) as err:
            generate(daemon.stub(), text="doomed too", max_new_tokens=30, ignore_eos=True)
        assert err.value.code() == grpc.StatusCode.INTERNAL and err.value.details() == message
    good = by_id["good"][-1].finished
    assert good.reason == FR.FINISH_REASON_LENGTH and good.usage.completion_tokens == 30
    s.start("again", text="the stream goes on", max_new_tokens=2, ignore_eos=True)
    assert read_until_finished(s, {"again"})["again"][-1].finished.reason == FR.FINISH_REASON_LENGTH
    s.close()
    assert list(s.responses) == []
    assert wait_until(lambda: drained(daemon))


def test_a_failure_handling_a_session_message_is_reported_and_the_stream_goes_on(daemon, monkeypatch):
    engine = daemon.engine
    monkeypatch.setattr(engine, "close", _failing_for("Conversation(id='c'", engine.close))
    s = SessionClient(daemon.stub())
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="c")))
    s._out.put(pb.SessionRequest(close_conversation=pb.CloseConversation(id="c")))
    msg = s.next()
    assert msg.WhichOneof("kind") == "refused"
    assert (msg.refused.kind, msg.refused.id, msg.refused.code) == (pb.SESSION_REQUEST_KIND_CLOSE_CONVERSATION, "c", INTERNAL)
    assert "RuntimeError: injected" in msg.refused.message
    s.start("next", text="still served", max_new_tokens=2, ignore_eos=True)  # the stream reads on
    assert read_until_finished(s, {"next"})["next"][-1].finished.reason == FR.FINISH_REASON_LENGTH
    s.close()
    assert list(s.responses) == []


def test_slow_reader_on_a_session_loses_its_requests_not_others(tiny_bundle, tmp_path):
    sock = tmp_path / "slow.sock"
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(sock)}, "engine": {"slots": 3},
                                   "generation": {"max_buffered_chunks": 48}}).start()
    try:
        # A tiny HTTP/2 window: the server soon cannot write, so undelivered chunks pile up on its side.
        channel = grpc.insecure_channel(f"unix:{sock}", options=[("grpc.http2.lookahead_bytes", 256),
                                                                 ("grpc.http2.bdp_probe", 0)])
        slow = SessionClient(pb_grpc.InferenceStub(channel))
        for rid in ("s1", "s2"):
            slow.start(rid, text="x", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True)
        assert slow.next().WhichOneof("kind") == "tokens"
        assert wait_until(lambda: not d.engine.running)  # both ended while the client was not reading
        ids, _, fin = generate(d.stub(), text="fast", max_new_tokens=20, ignore_eos=True)  # another stream
        assert len(ids) == 20 and fin.reason == FR.FINISH_REASON_LENGTH
        slow.close()
        ends = {m.id: m.finished for m in slow.responses if m.WhichOneof("kind") == "finished"}
        assert set(ends) == {"s1", "s2"}
        for fin in ends.values():
            assert fin.reason == FR.FINISH_REASON_CANCELLED and "did not read" in fin.message
        assert wait_until(lambda: drained(d))
    finally:
        d.stop()


# ---- statuses that had no test ---------------------------------------------------------------------------
def test_second_concurrent_turn_of_a_conversation_is_failed_precondition(daemon, gate):
    s = SessionClient(daemon.stub())
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="c")))
    gate.hold()
    for rid in ("t1", "t2"):
        s._out.put(pb.SessionRequest(start=pb.StartRequest(id=rid, conversation_id="c", request=pb.GenerateRequest(
            text="turn", max_new_tokens=4, ignore_eos=True))))
    msg = s.next()
    assert (msg.id, msg.WhichOneof("kind")) == ("t2", "error")
    assert msg.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "t1" in msg.error.message
    gate.open()
    assert read_until_finished(s, {"t1"})["t1"][-1].finished.reason == FR.FINISH_REASON_LENGTH
    s.close()
    assert list(s.responses) == []
    assert wait_until(lambda: drained(daemon))


def test_the_calls_own_deadline_ends_generate_without_leaking(daemon, gate):
    gate.hold()  # the request waits in the queue past the call's deadline
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.stub().Generate(pb.GenerateRequest(text="slow", max_new_tokens=4), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.open()
    assert wait_until(lambda: drained(daemon))
    assert generate(daemon.stub(), text="next", max_new_tokens=2, ignore_eos=True)[2].reason == FR.FINISH_REASON_LENGTH


def test_session_start_while_draining_is_unavailable(daemon):
    service = daemon.daemon.service
    s = SessionClient(daemon.stub())
    service.draining = True
    try:
        s.start("late", text="hi", max_new_tokens=2)
        msg = s.next()
    finally:
        service.draining = False
    assert (msg.id, msg.WhichOneof("kind")) == ("late", "error")
    assert msg.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "shutting down" in msg.error.message
    s.close()
    assert list(s.responses) == []


def test_queue_full_on_a_session_carries_retry_after(daemon, gate):
    s = SessionClient(daemon.stub())
    fill_slots_and_queue(daemon, gate, s, 4 + 8)
    s.start("one-too-many", text="fill", max_new_tokens=4)
    while (msg := s.next()).WhichOneof("kind") != "error":
        pass
    assert msg.id == "one-too-many" and msg.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert msg.error.retry_after.ToNanoseconds() >= 100_000_000
    s.responses.cancel()
    gate.open()
    assert wait_until(lambda: drained(daemon))


def test_session_client_going_away_releases_requests_and_conversations(daemon, gate):
    stub = daemon.stub()
    s = SessionClient(stub)
    s._out.put(pb.SessionRequest(open_conversation=pb.OpenConversation(id="c")))
    s._out.put(pb.SessionRequest(start=pb.StartRequest(id="turn", conversation_id="c", request=pb.GenerateRequest(
        text="hello", max_new_tokens=2, ignore_eos=True))))
    assert read_until_finished(s, {"turn"})["turn"][-1].finished.reason == FR.FINISH_REASON_LENGTH
    assert daemon.engine.slots_in_use == 1  # the idle conversation keeps its cache
    gate.hold()
    s._out.put(pb.SessionRequest(start=pb.StartRequest(id="turn2", conversation_id="c", request=pb.GenerateRequest(
        text="go on", max_new_tokens=TINY_CONTEXT - 16, ignore_eos=True))))
    for i in range(5):  # the other three slots busy, two queued
        s.start(f"r{i}", text="long", max_new_tokens=TINY_CONTEXT - 8, ignore_eos=True)
    assert wait_until(lambda: daemon.engine.queue_length == 6)
    gate.allow(1)
    assert wait_until(lambda: daemon.engine.slots_in_use == 4 and daemon.engine.queue_length == 2)
    assert daemon.engine.held and daemon.engine.held[0].busy  # the conversation's turn runs in its slot
    s.responses.cancel()  # the client goes away
    gate.open()
    assert wait_until(lambda: drained(daemon) and not daemon.engine.held)
