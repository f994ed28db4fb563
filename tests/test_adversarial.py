"""The adversarial client's scenarios, kept as bounded tests: floods of messages on one stream, many
conversations, a client that sends without reading, a client process killed mid-stream."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
from collections import Counter

import grpc
import pytest

from conftest import DaemonThread, cancel_reached_engine, wait_until
from daemon.session_stream import SessionStream
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

FR = pb.FinishReason


def idle(d: DaemonThread) -> bool:
    return d.engine.slots_in_use == 0 and d.engine.queue_length == 0


def session(stub, messages) -> list[pb.SessionResponse]:
    """Send messages on one Session stream, half-close, and read every response to the stream's end."""
    return list(stub.Session(iter(messages), timeout=120))


def test_ten_thousand_starts_on_one_stream_are_each_answered_once(daemon):
    n = 10_000
    starts = (pb.SessionRequest(start=pb.StartRequest(id=f"r{i}", request=pb.GenerateRequest(
        text="x", max_new_tokens=1, ignore_eos=True))) for i in range(n))
    ends = Counter()
    for msg in session(daemon.stub(), starts):
        kind = msg.WhichOneof("kind")
        assert kind in ("tokens", "finished", "error"), msg
        if kind == "error":  # beyond the queue or the connection's bound: refused at once, with a retry hint
            assert msg.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], msg
        if kind != "tokens":
            ends[msg.id] += 1
    assert len(ends) == n and set(ends.values()) == {1}
    assert wait_until(lambda: idle(daemon))


def test_conversations_open_at_once_on_a_stream_are_bounded(daemon):
    limit = daemon.config.limits.max_conversations_per_stream
    opens = [pb.SessionRequest(open_conversation=pb.OpenConversation(id=f"c{i}")) for i in range(limit + 100)]
    turn = pb.SessionRequest(start=pb.StartRequest(id="t", conversation_id="c0", request=pb.GenerateRequest(
        text="hello", max_new_tokens=2, ignore_eos=True)))
    replies = session(daemon.stub(), [*opens, turn])
    refused = [m.refused for m in replies if m.WhichOneof("kind") == "refused"]
    assert [r.id for r in refused] == [f"c{i}" for i in range(limit, limit + 100)]
    assert {r.code for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert "limits.max_conversations_per_stream" in refused[0].message
    (finished,) = [m.finished for m in replies if m.WhichOneof("kind") == "finished"]
    assert finished.reason == FR.FINISH_REASON_LENGTH  # the conversations within the bound work
    assert wait_until(lambda: idle(daemon))


def test_many_conversations_opened_and_closed_on_one_stream(daemon):
    n = 20_000
    messages = (pb.SessionRequest(**{kind: cls(id=f"c{i}")}) for i in range(n)
                for kind, cls in (("open_conversation", pb.OpenConversation), ("close_conversation", pb.CloseConversation)))
    assert session(daemon.stub(), messages) == []  # each open and close is accepted silently
    assert wait_until(lambda: idle(daemon))


def test_a_client_that_sends_without_reading_is_read_no_further(tiny_bundle, tmp_path, monkeypatch):
    """Refusals it never reads pile up to generation.max_buffered_chunks, then the server stops reading its
    messages (HTTP/2 flow control holds the client back) until it reads; nothing is lost."""
    streams: list[SessionStream] = []
    init = SessionStream.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(SessionStream, "__init__", recording_init)
    limit = 16
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")},
                                   "generation": {"max_buffered_chunks": limit}}).start()
    try:
        n = 3_000
        out: queue.Queue = queue.Queue()
        for i in range(n):
            out.put(pb.SessionRequest(cancel=pb.CancelRequest(id=f"nobody-{i}")))
        # A small window on the client's side: the server's refusals soon have nowhere to go.
        channel = grpc.insecure_channel(f"unix:{tmp_path / 's.sock'}", options=[("grpc.http2.lookahead_bytes", 256),
                                                                                ("grpc.http2.bdp_probe", 0)])
        responses = pb_grpc.InferenceStub(channel).Session(iter(out.get, None), timeout=120)
        assert wait_until(lambda: streams and not streams[0]._room.is_set())  # the reader waits for room
        backlog = streams[0].out.qsize()
        assert limit < backlog <= limit + 1
        out.put(None)
        refused = [m.refused for m in responses]  # reading lets the server read on
        assert [r.id for r in refused] == [f"nobody-{i}" for i in range(n)]
        assert {r.code for r in refused} == {grpc.StatusCode.NOT_FOUND.value[0]}
        channel.close()
    finally:
        d.stop()


CLIENT = textwrap.dedent("""
    import sys
    import grpc
    from edgellm.v1 import edgellm_pb2 as pb, edgellm_pb2_grpc as pb_grpc
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))
    stream = stub.Generate(pb.GenerateRequest(text="x", max_new_tokens=100, ignore_eos=True, stream_interval_ms=0))
    next(stream)
    print("streaming", flush=True)
    sys.stdin.read()  # until killed
""")


@pytest.mark.parametrize("transport", [0, 1], ids=["unix", "tcp"])
def test_a_client_process_killed_mid_stream_frees_its_request(daemon, gate, transport):
    cancelled = daemon.engine.metrics.requests.labels("normal", "cancelled")
    before = cancelled._value.get()
    gate.hold()
    gate.allow(2)  # its prefill and one decode step: the first token reaches the client, then the engine waits
    client = subprocess.Popen([sys.executable, "-c", CLIENT, daemon.daemon.addresses[transport]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline() == "streaming\n"
        client.kill()  # SIGKILL: the kernel closes its sockets; nothing is said on the stream
        client.wait(10)
        assert wait_until(lambda: cancel_reached_engine(daemon))
    finally:
        gate.open()
        if client.poll() is None:
            client.kill()
    assert wait_until(lambda: idle(daemon))
    assert cancelled._value.get() == before + 1  # ended as cancelled, not run on to its length
