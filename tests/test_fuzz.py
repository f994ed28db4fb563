"""Property-based fuzzing of the gRPC API (hypothesis) against a live daemon on the tiny model.

Random GenerateRequests (every prompt kind, extreme numbers, random unicode) run a few at a time, and
random Session scripts (start / cancel / open / close / empty messages with duplicate, unknown, reused
and malformed ids) run on a few streams at once; now and then the client goes away (cancels its call or
closes its connection). After every example the engine
must be idle again (slots in use and queue length 0, read from the Prometheus endpoint); after every
test the daemon must still answer, and a fixed greedy request must give the tokens it gave before.

Profiles (docs/fuzzing-and-soak.md): `ci` by default (bounded, derandomized: the same examples every
run); EDGELLM_FUZZ_PROFILE=long for a long randomized run; EDGELLM_FUZZ_EXAMPLES=N overrides the
examples per test in either.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import TINY_CONTEXT, DaemonThread, generate, wait_until
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fuzz

# ---- profiles -------------------------------------------------------------------------------------------
_SLOW_TARGET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# No shrinking in CI: a failure that leaves the daemon broken (a leaked slot) makes every later example fail
# slowly, so the first failing example is reported as it is; the long profile shrinks.
# 250 examples per test: the module takes ~15 s on a 2-core machine, under a minute however loaded.
settings.register_profile("ci", max_examples=250, deadline=None, derandomize=True, database=None,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate),
                          suppress_health_check=_SLOW_TARGET, print_blob=True)
# The same examples as `ci`, with a failure shrunk to a minimal one: to reduce what CI found.
settings.register_profile("ci-shrink", settings.get_profile("ci"), phases=tuple(Phase))
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_SLOW_TARGET,
                          print_blob=True)
PROFILE = os.environ.get("EDGELLM_FUZZ_PROFILE", "ci")
_EXAMPLES = os.environ.get("EDGELLM_FUZZ_EXAMPLES")


def fuzz_settings():
    """The chosen profile's settings, with EDGELLM_FUZZ_EXAMPLES examples where that is set."""
    base = settings.get_profile(PROFILE)
    return settings(base, max_examples=int(_EXAMPLES)) if _EXAMPLES else base


# A hang is a failure, never a stuck CI: every call has a deadline well above what a short generation takes.
CALL_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 15.0
DEFAULT_MAX_NEW = 6  # generation.default_max_new_tokens of the fuzzed daemon: short generations
# The long profile runs for as long as its examples take.
_TEST_TIMEOUT = pytest.mark.timeout(0 if PROFILE != "ci" else 300)

# ---- the daemon under test --------------------------------------------------------------------------------
BASELINE = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 17, 42, 99, 250, 7]), max_new_tokens=12,
                              ignore_eos=True, sampling=pb.SamplingParams(temperature=0))


@dataclass
class Target:
    """The fuzzed daemon, a client channel to it, and what its fixed greedy request gave before any fuzzing."""

    daemon: DaemonThread
    stub: object
    metrics_url: str
    baseline: list[int]
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8, thread_name_prefix="fuzz"))

    def gauges(self) -> dict[str, float]:
        body = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^edgellm_(slots_in_use|queue_length) (\S+)$", body, re.M)}

    def settle(self) -> None:
        """The engine must come back to idle: no slot held (not even by a conversation), nothing queued."""
        idle = wait_until(lambda: self.gauges() == {"slots_in_use": 0.0, "queue_length": 0.0}, SETTLE_TIMEOUT_S)
        assert idle, f"the engine did not return to idle after the example: {self.gauges()}"

    def assert_alive_and_unchanged(self) -> None:
        self.settle()
        info = self.stub.GetModel(pb.GetModelRequest(), timeout=CALL_TIMEOUT_S)
        assert info.context_length == TINY_CONTEXT
        ids, _, fin = generate_with(self.stub, BASELINE)
        assert fin.reason == pb.FINISH_REASON_LENGTH
        assert ids == self.baseline, "the fixed greedy request gives other tokens after the fuzzing"


def generate_with(stub, request: pb.GenerateRequest) -> tuple[list[int], str, pb.Finished]:
    return generate(stub, **{f.name: v for f, v in request.ListFields()})


@pytest.fixture(scope="module")
def target(tiny_bundle, tmp_path_factory):
    sock = tmp_path_factory.mktemp("fuzz") / "fuzz.sock"
    # Few slots and a short queue, so that queueing, preemption and "queue full" happen under fuzzing too.
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(sock)},
                                   "engine": {"slots": 2, "max_queued": 2, "prefill_chunk_tokens": 16},
                                   "generation": {"default_max_new_tokens": DEFAULT_MAX_NEW},
                                   "limits": {"max_requests_per_connection": 6},
                                   "service": {"metrics": "127.0.0.1:0"}}).start()
    stub = d.stub()
    baseline, _, _ = generate_with(stub, BASELINE)
    t = Target(d, stub, f"http://{d.daemon.metrics_address}/metrics", baseline)
    yield t
    t.pool.shutdown(wait=True)
    d.stop()


# ---- strategies -------------------------------------------------------------------------------------------
INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
ANY_FLOAT = st.floats(width=32)  # NaN, infinities, subnormals, -0.0 included
ROLES = ["system", "user", "assistant", "tool"]
# Ids at and around the 128-byte limit, in ASCII and in 4-byte characters (bytes, not characters, count).
EDGE_IDS = ["", "x" * 128, "x" * 129, "\U0001F600" * 32, "\U0001F600" * 33, " ", "\x00", "\u202e"]


def _optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def wild_requests(draw) -> pb.GenerateRequest:
    """Any GenerateRequest: every prompt kind or none, every field at sensible and extreme values."""
    req = pb.GenerateRequest()
    kind = draw(st.sampled_from(["none", "text", "chat", "token_ids"]))
    if kind == "text":
        req.text = draw(st.one_of(st.text(max_size=40), st.just("word " * 150)))
    elif kind == "chat":
        roles = st.one_of(st.sampled_from(ROLES), st.text(max_size=8))
        req.chat.SetInParent()  # an empty chat is a chat, not "no prompt"
        for role, content in draw(st.lists(st.tuples(roles, st.text(max_size=30)), max_size=4)):
            req.chat.messages.add(role=role, content=content)
    elif kind == "token_ids":
        req.token_ids.SetInParent()
        req.token_ids.ids.extend(draw(st.one_of(st.lists(st.one_of(st.integers(0, 600), INT32), max_size=24),
                                                st.lists(st.integers(3, 500), min_size=120, max_size=140))))
    s = req.sampling
    s.temperature = draw(st.one_of(st.just(0.0), st.floats(0, 2), ANY_FLOAT))
    s.top_k = draw(st.one_of(st.just(0), st.integers(1, 50), INT32))
    s.top_p = draw(st.one_of(st.just(0.0), st.floats(0.05, 1), ANY_FLOAT))
    s.min_p = draw(st.one_of(st.just(0.0), st.floats(0, 1), ANY_FLOAT))
    s.repetition_penalty = draw(st.one_of(st.just(0.0), st.floats(0.5, 2), ANY_FLOAT))
    if (seed := draw(_optional(UINT64))) is not None:
        s.seed = seed
    s.logprobs = draw(st.one_of(st.just(0), st.integers(-2, 22), INT32))
    if (max_new := draw(_optional(st.one_of(st.integers(1, 12), INT32)))) is not None:
        req.max_new_tokens = max_new
    req.stop.extend(draw(st.one_of(
        st.lists(st.one_of(st.text(min_size=1, max_size=3), st.just(""), st.text(min_size=257, max_size=260)), max_size=3),
        st.lists(st.text(min_size=1, max_size=2), min_size=17, max_size=18))))  # more than max_stop_sequences
    req.ignore_eos = draw(st.booleans())
    deadline = draw(_optional(st.one_of(st.builds(Duration, seconds=st.integers(0, 2), nanos=st.integers(0, 999_999_999)),
                                        st.builds(Duration, seconds=INT64, nanos=st.integers(-999_999_999, 999_999_999)))))
    if deadline is not None:
        req.deadline.CopyFrom(deadline)
    req.priority = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), INT32))
    if (interval := draw(_optional(st.one_of(st.sampled_from([0, 1, 20, 1000, 1001]), UINT32)))) is not None:
        req.stream_interval_ms = interval
    return req


@st.composite
def sensible_requests(draw) -> pb.GenerateRequest:
    """A request the daemon accepts (mostly): short, with random sampling, priority, deadline and streaming."""
    kind = draw(st.sampled_from(["text", "chat", "token_ids"]))
    if kind == "text":
        req = pb.GenerateRequest(text=draw(st.text(min_size=1, max_size=30)))
    elif kind == "chat":
        req = pb.GenerateRequest(chat=pb.ChatMessages(messages=[
            pb.ChatMessage(role=draw(st.sampled_from(ROLES)), content=draw(st.text(max_size=20)))]))
    else:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=draw(st.lists(st.integers(0, 500), min_size=1, max_size=20))))
    req.sampling.temperature = draw(st.sampled_from([0.0, 0.7, 1.5]))
    if draw(st.booleans()):
        req.sampling.seed = draw(st.integers(0, 2**64 - 1))
    req.sampling.logprobs = draw(st.sampled_from([0, 0, 3]))
    if (max_new := draw(_optional(st.integers(1, 24)))) is not None:
        req.max_new_tokens = max_new
    req.ignore_eos = draw(st.booleans())
    req.priority = draw(st.sampled_from([0, 1, 2, 3]))
    if draw(st.booleans()):  # common text, so that stop sequences do match now and then
        req.stop.append(draw(st.one_of(st.sampled_from(["e", " ", "o", "th", "\n"]), st.text(min_size=1, max_size=2))))
    if (ms := draw(_optional(st.one_of(st.integers(1, 40), st.integers(1, 400))))) is not None:
        req.deadline.FromMilliseconds(ms)
    if (interval := draw(_optional(st.sampled_from([0, 5, 50])))) is not None:
        req.stream_interval_ms = interval
    return req


# Mostly requests that run, so that the engine's paths (queueing, preemption, deadlines, stops) get exercised.
REQUESTS = st.one_of(sensible_requests(), sensible_requests(), wild_requests())


# ---- Generate ---------------------------------------------------------------------------------------------
@dataclass
class GenerateOutcome:
    ids: list[int]
    chunks: int  # messages before the last
    finished: pb.Finished | None
    extra_after_finished: int
    error: grpc.RpcError | None


@dataclass(frozen=True)
class Vanish:
    """The client goes away: it cancels the call, or closes its connection under it (disconnect)."""

    after: int  # messages read (Generate) or sent (Session) first
    disconnect: bool


class Client:
    """The fuzzer's client for one call: the shared connection, or one of its own for a client that disconnects."""

    def __init__(self, target: Target, vanish: Vanish | None):
        self.channel = grpc.insecure_channel(target.daemon.daemon.addresses[0]) if vanish and vanish.disconnect else None
        self.stub = pb_grpc.InferenceStub(self.channel) if self.channel else target.stub

    def go_away(self, call) -> None:
        if self.channel is not None:
            self.channel.close()
        else:
            call.cancel()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


def run_generate(target: Target, req: pb.GenerateRequest, vanish: Vanish | None = None) -> GenerateOutcome:
    """One Generate call read to its end, or left by the client after `vanish.after` messages."""
    ids, chunks, finished, extra = [], 0, None, 0
    client = Client(target, vanish)
    call = client.stub.Generate(req, timeout=CALL_TIMEOUT_S)
    if vanish is not None and vanish.after == 0:
        client.go_away(call)
    try:
        for msg in call:
            if vanish is not None and chunks + 1 >= vanish.after:
                client.go_away(call)
            if finished is not None:
                extra += 1
            elif msg.HasField("tokens"):
                chunks += 1
                ids += msg.tokens.token_ids
                assert len(msg.tokens.logprobs) in (0, len(msg.tokens.token_ids))
            elif msg.HasField("finished"):
                finished = msg.finished
            else:
                extra += 1  # a message with neither kind set
    except grpc.RpcError as e:
        return GenerateOutcome(ids, chunks, finished, extra, e)
    finally:
        client.close()
    return GenerateOutcome(ids, chunks, finished, extra, None)


# How a request the daemon accepted may end (FINISH_REASON_ERROR is an engine failure: a bug).
GOOD_ENDINGS = {pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_DEADLINE}
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def check_generate(req: pb.GenerateRequest, out: GenerateOutcome, vanished: bool = False) -> None:
    if vanished and out.error is not None and out.error.code() == grpc.StatusCode.CANCELLED:
        return  # the client went away; the settle check sees that the server let go of the request
    if out.error is not None:
        e = out.error
        assert e.code() in REFUSALS, f"{e.code()}: {e.details()}"
        assert e.details(), "a refusal must say what is wrong"
        assert not out.ids and out.finished is None, "a refused request streamed something"
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert any(k == "retry-after-ms" for k, _ in e.trailing_metadata() or ()), "RESOURCE_EXHAUSTED without retry-after-ms"
        return
    assert out.finished is not None, "the stream ended without a Finished message"
    assert out.extra_after_finished == 0, "messages after Finished"
    fin = out.finished
    assert fin.reason in GOOD_ENDINGS, f"{pb.FinishReason.Name(fin.reason)}: {fin.message}"
    usage = fin.usage
    eos = fin.reason == pb.FINISH_REASON_STOP and not fin.stop_sequence  # the EOS token counts but is not sent
    assert len(out.ids) == usage.completion_tokens - eos, "tokens streamed != completion_tokens"
    assert usage.prompt_tokens + usage.completion_tokens <= TINY_CONTEXT
    limit = req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_MAX_NEW
    assert usage.completion_tokens <= limit
    if fin.reason == pb.FINISH_REASON_LENGTH:
        assert usage.completion_tokens == limit or usage.prompt_tokens + usage.completion_tokens == TINY_CONTEXT
    if fin.stop_sequence:
        assert fin.stop_sequence in req.stop


@_TEST_TIMEOUT
def test_fuzz_generate(target):
    """A few random requests at once on one connection: each is refused with a clear status or ends with one Finished."""

    # Each request with, one time in four, a client that goes away after 0-3 messages.
    calls = st.tuples(REQUESTS, st.one_of(st.none(), st.none(), st.none(), st.builds(Vanish, st.integers(0, 3), st.booleans())))

    @fuzz_settings()
    @given(batch=st.lists(calls, min_size=1, max_size=6))
    def run(batch):
        outcomes = list(target.pool.map(lambda call: run_generate(target, *call), batch))
        for (req, vanish), out in zip(batch, outcomes):
            check_generate(req, out, vanished=vanish is not None)
        target.settle()

    run()
    target.assert_alive_and_unchanged()


# ---- Session ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    id: str
    request: pb.GenerateRequest
    conversation_id: str = ""


@dataclass(frozen=True)
class Cancel:
    id: str


@dataclass(frozen=True)
class Open:
    id: str


@dataclass(frozen=True)
class Close:
    id: str


@dataclass(frozen=True)
class Empty:
    """A SessionRequest with none of its fields set."""


@dataclass(frozen=True)
class Wait:
    """The client waits until every answer it can be sure of so far has come (requests end, ids get reused)."""


@dataclass(frozen=True)
class Script:
    ops: list
    vanish: Vanish | None = None  # the client goes away after sending `vanish.after` of the ops


def ids_from(pool: list[str]):
    """Mostly a few short ids (duplicates, reuse), else ids at the limits or random unicode."""
    return st.one_of(st.sampled_from(pool), st.sampled_from(pool), st.sampled_from(EDGE_IDS), st.text(max_size=10))


REQUEST_IDS = ids_from(["a", "b", "c"])
CONVERSATION_IDS = ids_from(["c1", "c2"])

@st.composite
def scripts(draw) -> Script:
    """Up to 14 messages; starts are often turns of a conversation the script opened (and may have closed)."""
    ops, opened = [], []
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["start", "start", "start", "cancel", "cancel", "open", "close", "wait", "empty"]))
        if kind == "start":
            conversation = draw(st.sampled_from(["", "", *opened, *opened]) | CONVERSATION_IDS) if opened else \
                draw(st.sampled_from(["", "", ""]) | CONVERSATION_IDS)
            ops.append(Start(draw(REQUEST_IDS), draw(REQUESTS), conversation))
        elif kind == "cancel":
            ops.append(Cancel(draw(REQUEST_IDS)))
        elif kind == "open":
            ops.append(Open(draw(CONVERSATION_IDS)))
            opened.append(ops[-1].id)
        elif kind == "close":
            ops.append(Close(draw(st.sampled_from(opened) | CONVERSATION_IDS) if opened else draw(CONVERSATION_IDS)))
        else:
            ops.append(Wait() if kind == "wait" else Empty())
    # One script in three: the client goes away, anywhere in the script (Wait ops let answers come first).
    vanish = draw(st.sampled_from([None, None, "vanish"]))
    return Script(ops, None if vanish is None else Vanish(draw(st.integers(0, len(ops))), draw(st.booleans())))


def to_message(op) -> pb.SessionRequest:
    if isinstance(op, Start):
        return pb.SessionRequest(start=pb.StartRequest(id=op.id, request=op.request, conversation_id=op.conversation_id))
    if isinstance(op, Cancel):
        return pb.SessionRequest(cancel=pb.CancelRequest(id=op.id))
    if isinstance(op, Open):
        return pb.SessionRequest(open_conversation=pb.OpenConversation(id=op.id))
    if isinstance(op, Close):
        return pb.SessionRequest(close_conversation=pb.CloseConversation(id=op.id))
    return pb.SessionRequest()


def _valid_id(rid: str) -> bool:
    return 1 <= len(rid.encode()) <= 128


def expected_answers(ops: list) -> tuple[Counter, Counter, list[int]]:
    """(fewest, most) answers per id, and after each op the fewest answers in all so far.

    An answer is a message that ends something on the stream: Finished, error (or a refusal, once the protocol
    has its own kind for them). Every start gets exactly one. A cancel of an id never started on this stream,
    an open of an open (or malformed) conversation id, a close of one not open and an empty message get one
    each; a cancel of an id started earlier gets one only if that request has ended meanwhile (timing).
    Conversation state depends on the order of messages only, so it is modelled exactly.
    """
    fewest, most, lower = Counter(), Counter(), []
    started, open_conversations = set(), set()
    total = 0

    def certain(rid: str) -> None:
        nonlocal total
        fewest[rid] += 1
        most[rid] += 1
        total += 1

    for op in ops:
        if isinstance(op, Start):
            certain(op.id)
            if _valid_id(op.id):
                started.add(op.id)
        elif isinstance(op, Cancel):
            if op.id in started:
                most[op.id] += 1
            else:
                certain(op.id)
        elif isinstance(op, Open):
            if not _valid_id(op.id) or op.id in open_conversations:
                certain(op.id)
            else:
                open_conversations.add(op.id)
        elif isinstance(op, Close):
            if op.id in open_conversations:
                open_conversations.remove(op.id)
            else:
                certain(op.id)
        elif isinstance(op, Empty):
            certain("")
        lower.append(total)
    return fewest, most, lower


# The one place that knows the response kinds. Today a refusal of a message that starts nothing (a cancel of
# an unknown id, a duplicate open...) comes as `error` under that id, like a failed request; a protocol that
# gives refusals a kind of their own is handled by REFUSAL_KINDS (any kind but these three), which also makes
# the check stricter: then only starts may end with finished/error.
TOKENS, END, REFUSAL = "tokens", "end", "refusal"
_KNOWN_KINDS = {"tokens": TOKENS, "finished": END, "error": END}
REFUSAL_KINDS = {f.name for f in pb.SessionResponse.DESCRIPTOR.oneofs_by_name["kind"].fields} - set(_KNOWN_KINDS)


def classify(msg: pb.SessionResponse) -> tuple[str, str]:
    """(category, the id it concerns) of one SessionResponse."""
    kind = msg.WhichOneof("kind")
    assert kind is not None, f"a SessionResponse with no kind: {msg}"
    if kind == "finished":
        assert msg.finished.reason in GOOD_ENDINGS | {pb.FINISH_REASON_CANCELLED}, \
            f"{msg.id!r}: {pb.FinishReason.Name(msg.finished.reason)}: {msg.finished.message}"
    elif kind == "error":
        code = msg.error.code
        assert code not in (grpc.StatusCode.OK.value[0], grpc.StatusCode.UNKNOWN.value[0],
                            grpc.StatusCode.INTERNAL.value[0]), f"{msg.id!r}: error code {code}: {msg.error.message}"
        assert msg.error.message, f"{msg.id!r}: an error without a message"
    elif kind == "tokens":
        assert len(msg.tokens.logprobs) in (0, len(msg.tokens.token_ids))
    elif kind == "refused":  # a message that starts no request: the id it named is in the body, never in msg.id
        assert msg.id == "", f"a refusal addressed to {msg.id!r}: {msg}"
        assert msg.refused.code != grpc.StatusCode.OK.value[0] and msg.refused.message, f"a refusal without a reason: {msg}"
        return REFUSAL, msg.refused.id
    return (_KNOWN_KINDS.get(kind) or REFUSAL), msg.id


@dataclass
class Ledger:
    """What one Session stream has said, per id and category, as the reader sees it."""

    counts: Counter = field(default_factory=Counter)  # (id, category) -> messages
    last: dict = field(default_factory=dict)  # id -> category of its last message
    answers: int = 0
    ended: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, category: str, rid: str) -> None:
        with self.cond:
            self.counts[rid, category] += 1
            self.last[rid] = category
            if category != TOKENS:
                self.answers += 1
            self.cond.notify_all()

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait_for_answers(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.ended or self.answers >= n, timeout=CALL_TIMEOUT_S)


def run_session(target: Target, script: Script) -> tuple[Ledger, grpc.RpcError | None]:
    """Send the script on one Session (waiting where it says), read every response: (ledger, how the call failed)."""
    outgoing: queue.Queue = queue.Queue()
    client = Client(target, script.vanish)
    call = client.stub.Session(iter(outgoing.get, None), timeout=CALL_TIMEOUT_S)
    ledger = Ledger()
    _, _, lower = expected_answers(script.ops)

    def send() -> None:
        for i, op in enumerate(script.ops):
            if script.vanish is not None and i == script.vanish.after:
                break
            if isinstance(op, Wait):  # only answers sure to come are waited for, so this never hangs
                ledger.wait_for_answers(lower[i])
            else:
                outgoing.put(to_message(op))
        if script.vanish is None:
            outgoing.put(None)  # half-close: the stream ends once every request on it has ended
        else:
            client.go_away(call)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    error = None
    try:
        for msg in call:
            ledger.add(*classify(msg))
    except grpc.RpcError as e:
        error = e
    finally:
        ledger.end()
        outgoing.put(None)
        sender.join(CALL_TIMEOUT_S)
        client.close()
    return ledger, error


def check_session(script: Script, ledger: Ledger, error: grpc.RpcError | None) -> None:
    if script.vanish is not None:
        # The client went away: the stream ends at once (cancelled here); the settle check sees the server clean up.
        assert error is None or error.code() == grpc.StatusCode.CANCELLED, f"{error.code()}: {error.details()}"
        return
    assert error is None, f"the stream failed: {error.code()}: {error.details()}"
    fewest, most, _ = expected_answers(script.ops)
    starts = Counter(op.id for op in script.ops if isinstance(op, Start))
    for rid in {rid for rid, _ in ledger.counts} | set(fewest) | set(most):
        ends, refusals = ledger.counts[rid, END], ledger.counts[rid, REFUSAL]
        finished_or_error = ends + refusals
        assert fewest[rid] <= finished_or_error <= most[rid], (
            f"id {rid!r}: {finished_or_error} answers, expected {fewest[rid]}..{most[rid]} ({ledger.counts})")
        if REFUSAL_KINDS:  # refusals apart: each start ends once, nothing else ends a request
            assert ends <= starts[rid], f"id {rid!r}: {ends} requests ended for {starts[rid]} starts"
        if ledger.counts[rid, TOKENS]:
            assert starts[rid], f"tokens for {rid!r}, which was never started"
            assert ledger.last[rid] != TOKENS, f"the request {rid!r}'s stream ended without Finished or error"


@_TEST_TIMEOUT
def test_fuzz_session(target):
    """Random Session scripts: every start is answered once, nothing is answered twice, every stream ends."""

    @fuzz_settings()
    @given(batch=st.lists(scripts(), min_size=1, max_size=3))
    def run(batch):  # one to three streams at once, on one connection
        results = list(target.pool.map(lambda script: run_session(target, script), batch))
        for script, (ledger, error) in zip(batch, results):
            check_session(script, ledger, error)
        target.settle()

    run()
    target.assert_alive_and_unchanged()


def test_expected_answers_model():
    """The session model itself: certain answers, timing-dependent ones, and exact conversation state."""
    ops = [Start("a", BASELINE), Cancel("a"), Cancel("zz"), Open("c"), Open("c"), Close("c"), Close("c"),
           Start("", BASELINE), Empty(), Open("x" * 129), Start("b", BASELINE, "c"), Wait()]
    fewest, most, lower = expected_answers(ops)
    assert fewest == Counter({"a": 1, "zz": 1, "c": 2, "": 2, "x" * 129: 1, "b": 1})
    assert most == fewest + Counter({"a": 1})
    assert lower == [1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 8]
