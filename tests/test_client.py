"""edgellm.client against a real daemon (gRPC over a Unix socket or loopback TCP): what it streams, how it
multiplexes a Session, what it retries and what it raises."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field

import grpc
import pytest

from conftest import DaemonThread, cancel_reached_engine, generate, wait_until
from edgellm.socket_trust import SocketMissing
from edgellm.client import (NO_RETRIES, AsyncClient, Client, Conversation, EdgeLLMError, RetryPolicy,
                            UntrustedSocket, make_request)
from edgellm.v1 import edgellm_pb2 as pb

PROMPT = [5, 6, 7, 8]


def unix_address(d: DaemonThread) -> str:
    return d.daemon.addresses[0]


def tcp_address(d: DaemonThread) -> str:
    return d.daemon.addresses[1]


def test_generate_streams_chunks_then_a_result(daemon):
    expected, _, _ = generate(daemon.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=6, ignore_eos=True)
    with Client(unix_address(daemon)) as client:
        stream = client.generate(PROMPT, max_new_tokens=6, ignore_eos=True, logprobs=2)
        chunks = list(stream)
    assert [t for c in chunks for t in c.token_ids] == expected  # greedy: the same tokens as the bare stub's
    assert all(len(c.logprobs) == len(c.token_ids) and all(len(lp.top) == 2 for lp in c.logprobs) for c in chunks)
    assert sum(len(c.logprobs) for c in chunks) == 6
    r = stream.result
    assert (r.finish_reason, r.prompt_tokens, r.completion_tokens, r.attempts) == ("length", 4, 6, 1)
    assert 0 < r.time_to_first_token_s <= r.total_s


def test_complete_over_tcp_with_chat_messages_and_a_stop(daemon):
    with Client(tcp_address(daemon)) as client:
        done = client.complete([("system", "be brief"), {"role": "user", "content": "hi"}], max_new_tokens=5,
                               temperature=0.8, seed=3)
        again = client.complete([("system", "be brief"), ("user", "hi")], max_new_tokens=5, temperature=0.8, seed=3)
    assert done.token_ids == again.token_ids and done.text == again.text  # the seed fixes the sample
    assert done.result.finish_reason in ("stop", "length") and done.result.completion_tokens == len(done.token_ids)


def test_async_client_generates_the_same_tokens(daemon):
    async def run():
        async with AsyncClient(unix_address(daemon)) as client:
            info = await client.model()
            stream = client.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
            ids = [t async for c in stream for t in c.token_ids]
            return info, ids, stream.result, await client.complete("hello", max_new_tokens=3, ignore_eos=True)

    info, ids, result, completion = asyncio.run(run())
    expected, _, _ = generate(daemon.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=6, ignore_eos=True)
    assert info.architecture == "llama" and ids == expected and result.finish_reason == "length"
    assert len(completion.token_ids) == 3


def test_errors_carry_the_status_and_bad_requests_are_not_retried(daemon):
    with Client(unix_address(daemon)) as client:
        stream = client.generate(PROMPT, max_new_tokens=10_000)  # beyond the 128-token context
        with pytest.raises(EdgeLLMError) as e:
            list(stream)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.message
        assert stream.attempts == 1 and e.value.retry_after is None
        with pytest.raises(ValueError, match="priority"):
            client.generate(PROMPT, priority="urgent")


def test_an_unreachable_daemon_is_retried_then_reported_unavailable(tmp_path):
    with Client(f"unix:{tmp_path / 'nobody.sock'}", retry=RetryPolicy(max_attempts=3, initial_backoff=0.001)) as client:
        stream = client.generate("hi")
        with pytest.raises(EdgeLLMError) as e:
            list(stream)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and stream.attempts == 3


def test_a_deadline_ends_the_call_without_retry(daemon, gate):
    gate.hold()  # no step runs: nothing is generated before the deadline
    with Client(unix_address(daemon)) as client:
        stream = client.generate(PROMPT, max_new_tokens=4, timeout=0.3)
        with pytest.raises(EdgeLLMError) as e:
            list(stream)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and stream.attempts == 1
    gate.open()


def test_the_requests_own_deadline_ends_it_with_that_reason(daemon):
    with Client(unix_address(daemon)) as client:
        done = client.complete(PROMPT, max_new_tokens=100, ignore_eos=True, deadline=1e-6)  # gone before prefill
    assert done.result.finish_reason == "deadline" and done.token_ids == [] and done.result.attempts == 1


def test_cancel_mid_stream_reaches_the_engine(daemon, gate):
    gate.hold()
    gate.allow(2)  # prefill and one decode step: some tokens out, then the engine waits
    with Client(unix_address(daemon)) as client:
        stream = client.generate(PROMPT, max_new_tokens=50, ignore_eos=True)
        it = iter(stream)
        first = next(it)
        assert first.token_ids
        stream.cancel()
        with pytest.raises(EdgeLLMError) as e:
            list(it)
        assert e.value.code == grpc.StatusCode.CANCELLED and stream.attempts == 1
        assert wait_until(lambda: cancel_reached_engine(daemon) or not daemon.engine.running)
    gate.open()
    assert wait_until(lambda: daemon.engine.slots_in_use == 0)


def test_session_multiplexes_threads_and_keeps_conversations(daemon):
    expected, _, _ = generate(daemon.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=5, ignore_eos=True)
    with Client(unix_address(daemon)) as client, client.session() as s:
        requests = [s.generate(PROMPT, max_new_tokens=5, ignore_eos=True) for _ in range(6)]
        results: dict[str, list[int]] = {}

        def read(r) -> None:
            results[r.id] = r.complete().token_ids

        threads = [threading.Thread(target=read, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len({r.id for r in requests}) == 6 and all(ids == expected for ids in results.values())
        with s.conversation() as conv:
            first = conv.generate([("user", "hello")], max_new_tokens=4).complete()
            second = conv.generate([("user", "and then?")], max_new_tokens=4).complete()
        # The second turn reuses the cache of the first (its prompt and its reply).
        assert second.result.cached_prompt_tokens >= first.result.prompt_tokens > 0


def test_session_cancel_and_refusals(daemon, gate):
    gate.hold()
    gate.allow(2)
    with Client(unix_address(daemon)) as client, client.session() as s:
        r = s.generate(PROMPT, max_new_tokens=50, ignore_eos=True)
        it = iter(r)
        assert next(it).token_ids
        r.cancel()
        assert wait_until(lambda: cancel_reached_engine(daemon))  # before the gate lets the rest run
        gate.open()
        list(it)
        assert r.result.finish_reason == "cancelled"
        bad = s.generate(PROMPT, max_new_tokens=10_000)
        with pytest.raises(EdgeLLMError) as e:
            list(bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # A turn of a conversation never opened: the daemon's error, raised in that request only.
        with pytest.raises(EdgeLLMError) as e:
            list(s.generate("x", max_new_tokens=2, conversation=Conversation(s, "nope")))
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert s.generate(PROMPT, max_new_tokens=2).complete().result.finish_reason == "length"  # the stream goes on
    with pytest.raises(EdgeLLMError, match="closed"):  # after close(), a start would never be sent: refused here
        s.generate(PROMPT, max_new_tokens=2)


def test_async_session_with_a_conversation(daemon):
    async def run():
        async with AsyncClient(unix_address(daemon)) as client, client.session() as s:
            conv = await s.conversation()
            one = await (await conv.generate("The", max_new_tokens=3, ignore_eos=True)).complete()
            two = await (await conv.generate(" next", max_new_tokens=3, ignore_eos=True)).complete()
            others = await asyncio.gather(*[(await s.generate(PROMPT, max_new_tokens=4, ignore_eos=True)).complete()
                                            for _ in range(4)])
            conv.close()
            return one, two, others

    one, two, others = asyncio.run(run())
    assert two.result.cached_prompt_tokens >= one.result.prompt_tokens + 2
    assert len({tuple(o.token_ids) for o in others}) == 1 and len(others[0].token_ids) == 4


@dataclass(frozen=True)
class RecordingPolicy(RetryPolicy):
    """Retries quickly, noting the server's retry_after each time."""

    seen: list = field(default_factory=list)

    def delay(self, error: EdgeLLMError, attempt: int) -> float:
        self.seen.append((error.code, error.retry_after))
        return 0.02


@pytest.fixture(scope="module")
def one_slot(tiny_bundle, tmp_path_factory):
    """A daemon with one slot and no queue: a second request while one runs is RESOURCE_EXHAUSTED."""
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path_factory.mktemp("sock") / "s.sock")},
                                   "engine": {"slots": 1, "max_queued": 0}}).start()
    yield d
    d.stop()


@pytest.mark.parametrize("on_session", [False, True])
def test_a_full_queue_is_retried_with_the_servers_hint(one_slot, step_gate, on_session):
    gate = step_gate(one_slot)
    gate.hold()
    policy = RecordingPolicy(max_attempts=200)
    with Client(unix_address(one_slot), retry=policy) as client:
        blocker = client.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
        reader = threading.Thread(target=lambda: list(blocker))
        reader.start()
        assert wait_until(lambda: one_slot.engine.queue_length == 1)  # it takes the one slot at the next step
        threading.Thread(target=lambda: wait_until(lambda: len(policy.seen) >= 2) and gate.open()).start()
        if on_session:
            with client.session() as s:
                r = s.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
                done = r.complete()
        else:
            done = client.complete(PROMPT, max_new_tokens=2, ignore_eos=True)
        reader.join(30)
    assert done.result.finish_reason == "length" and done.result.attempts >= 3
    codes = {c for c, _ in policy.seen}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(after is not None and after > 0 for _, after in policy.seen)  # the retry-after-ms hint, read


def test_async_client_reads_the_retry_hint_and_cancels(one_slot, step_gate):
    gate = step_gate(one_slot)
    gate.hold()

    async def run():
        async with AsyncClient(unix_address(one_slot), retry=NO_RETRIES) as client:
            blocker = client.generate(PROMPT, max_new_tokens=50, ignore_eos=True)
            it = blocker.__aiter__()
            first = asyncio.ensure_future(it.__anext__())
            assert await asyncio.to_thread(wait_until, lambda: one_slot.engine.queue_length == 1)
            refused = client.generate(PROMPT, max_new_tokens=2)
            with pytest.raises(EdgeLLMError) as full:
                [c async for c in refused]
            gate.allow(2)
            assert (await first).token_ids
            blocker.cancel()
            with pytest.raises(EdgeLLMError) as cancelled:
                [c async for c in it]
            return full.value, refused.attempts, cancelled.value

    full, attempts, cancelled = asyncio.run(run())
    gate.open()
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and full.retry_after > 0 and attempts == 1
    assert cancelled.code == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: one_slot.engine.slots_in_use == 0)


def test_backoff_grows_jitters_and_never_undercuts_retry_after():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5)
    plain = EdgeLLMError(grpc.StatusCode.UNAVAILABLE, "gone")
    for attempt, backoff in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 1.0)):
        waits = {policy.delay(plain, attempt) for _ in range(50)}
        assert all(backoff * 0.5 <= w <= backoff for w in waits) and len(waits) > 1
    hinted = EdgeLLMError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_after=2.0)
    assert all(2.0 <= policy.delay(hinted, 1) <= 2.5 for _ in range(50))
    # Once a token has streamed, or for a status a retry cannot mend, never.
    assert policy.should_retry(plain, 1) and not policy.should_retry(plain, 5)
    assert not policy.should_retry(EdgeLLMError(grpc.StatusCode.UNAVAILABLE, "reset", tokens_streamed=3), 1)
    assert not policy.should_retry(EdgeLLMError(grpc.StatusCode.CANCELLED, "x"), 1, cancelled_here=True)
    assert not policy.should_retry(EdgeLLMError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), 1)
    assert not NO_RETRIES.should_retry(plain, 1)


def test_the_default_socket_is_used_only_when_it_can_be_trusted(daemon, tmp_path, monkeypatch):
    folder = os.path.dirname(unix_address(daemon).removeprefix("unix:"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", folder)  # the fixture's socket is named as the default one
    with Client() as client:
        assert client.model().architecture == "llama"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    with pytest.raises(UntrustedSocket, match="writable by group or others"):
        Client()
    shared.chmod(0o700)
    with pytest.raises(SocketMissing, match="no socket at"):
        Client()


def test_address_lists_and_option_errors():
    with pytest.raises(ValueError, match="IP literals"):
        Client(["localhost:1", "127.0.0.1:2"])
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        Client("127.0.0.1:1", client_cert="/c.pem")
    with pytest.raises(ValueError, match="TLS is for TCP"):
        Client("/run/x.sock", tls=True)
    assert Client(["127.0.0.1:1", "127.0.0.1:2"]).connection.target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert make_request(pb.GenerateRequest(text="as is")).text == "as is"


def test_mutual_tls_and_token(tiny_bundle, tmp_path):
    from test_service import _certificates

    _certificates(tmp_path)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    access = {"tls_cert": str(tmp_path / "server_cert.pem"), "tls_key": str(tmp_path / "server_key.pem"),
              "tls_client_ca": str(tmp_path / "ca.pem"), "token_file": str(token)}
    d = DaemonThread(tiny_bundle, {"listen": {"unix": None, "tcp": "127.0.0.1:0"}, "access": access}).start()
    try:
        port = d.daemon.addresses[0].rsplit(":", 1)[1]
        pems = dict(ca_cert=str(tmp_path / "ca.pem"), client_cert=str(tmp_path / "client_cert.pem"),
                    client_key=str(tmp_path / "client_key.pem"))
        with Client(f"localhost:{port}", token="t0ken", **pems) as client:
            assert client.complete("hi", max_new_tokens=2, ignore_eos=True).result.completion_tokens == 2
        with Client(f"localhost:{port}", token="wrong", **pems) as client:
            with pytest.raises(EdgeLLMError) as e:
                client.model()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "wrong bearer token" in e.value.message
        # The certificate names localhost: an IP address needs server_name to check it against.
        with Client(f"127.0.0.1:{port}", token="t0ken", server_name="localhost", **pems) as client:
            assert client.model().architecture == "llama"
    finally:
        d.stop()


def test_the_client_ships_without_the_daemon_or_the_build():
    from test_package_boundaries import modules_loaded_by, under

    loaded = modules_loaded_by("edgellm.client")
    assert "edgellm.client.sync" in loaded and "edgellm.client.aio" in loaded
    assert under(loaded, "daemon", "build_engine", "bundle_format", "numpy", "onnxruntime", "yaml") == set()
    assert {m for m in under(loaded, "edgellm") if not m.startswith(("edgellm.client", "edgellm.v1"))} == {
        "edgellm", "edgellm.socket_trust"}
