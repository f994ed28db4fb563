"""The prefix cache (daemon/prefix_cache.py): block bookkeeping, the engine's use of it on a fake backend whose cache
holds token ids (a wrong copy changes the output), logits parity on every architecture's real CPU graph, snapshots,
and real daemons (reuse across requests, salts, pressure, restart, warm prompts)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from bundle_format.kv_cache import KvCacheLayout
from conftest import DaemonThread, generate
from daemon.config import ConfigError, parse_config
from daemon.engine import Engine
from daemon.prefix_cache import (SNAPSHOT_NAME, PrefixCache, SnapshotWriter, create_prefix_cache, namespace,
                                 request_scope)
from daemon.sequence import Priority
from edgellm.v1 import edgellm_pb2 as pb
from test_engine import MAX_SEQ, Clock, FakeBackend, FakeTokenizer, alone, run, seq

SCOPE = request_scope("shared", None, "")
LAYOUT = KvCacheLayout(num_layers=1, num_kv_heads=1, max_seq=MAX_SEQ, head_dim=1, dtype="float32")


class KvFakeBackend(FakeBackend):
    """The engine tests' fake backend with the prefix cache's copies: a slot's "K/V" are its token ids."""

    def __init__(self, slots: int):
        super().__init__(slots)
        self.written: list[tuple[int, int, int]] = []  # (slot, start, tokens) of each write_kv

    def read_kv(self, slot, start, end):
        return self.cache[slot, start:end].astype(np.float32).reshape(1, 1, 1, end - start, 1).repeat(2, axis=1)

    def write_kv(self, slot, start, kv):
        n = kv.shape[3]
        self.written.append((slot, start, n))
        self.cache[slot, start:start + n] = kv[0, 0, 0, :, 0].astype(np.int64)


def make_cache(block_tokens=4, blocks=8, layout=LAYOUT, **kw) -> PrefixCache:
    probe = PrefixCache(b"test", layout, block_tokens, 0)
    return PrefixCache(namespace("bundle-x", layout, block_tokens), layout, block_tokens, blocks * probe.block_bytes, **kw)


def make_engine(slots=2, chunk=16, cache=None):
    clock = Clock()
    cache = cache or make_cache()
    eng = Engine(KvFakeBackend(slots), FakeTokenizer(), MAX_SEQ - 1, prefill_chunk_tokens=chunk, clock=clock,
                 prefix_cache=cache)
    return eng, clock


def cached_seq(prompt, n, clock, scope=SCOPE, **kw):
    s, rec = seq(prompt, n, clock, **kw)
    s.cache_scope = scope
    return s, rec


def fill(kv_value: float, cache: PrefixCache) -> np.ndarray:
    return np.full(cache.block_shape, kv_value, cache.block_dtype)


# ---- bookkeeping ------------------------------------------------------------------------------------------
def test_keys_chain_the_whole_prefix_and_match_takes_the_longest_run():
    cache = make_cache(block_tokens=4)
    a = list(range(1, 13))  # 3 blocks
    b = [*a[:4], 99, *a[5:]]  # differs in block 2: only block 1 is shared
    keys_a, keys_b = list(cache.keys(a, 12, SCOPE)), list(cache.keys(b, 12, SCOPE))
    assert len(keys_a) == 3 and keys_a[0] == keys_b[0] and keys_a[1] != keys_b[1]
    assert keys_a[2] != keys_b[2]  # block 3's tokens are equal, but its prefix is not: a different key
    assert list(cache.keys(a, 11, SCOPE)) == keys_a[:2]  # only full blocks
    stored = cache.store(a, 12, SCOPE, lambda s, e: np.arange(s, e, dtype=np.float32).reshape(1, 1, 1, e - s, 1).repeat(2, 1))
    assert stored == 3 and cache.store(a, 12, SCOPE, lambda s, e: pytest.fail("read again")) == 0
    got = cache.match(b, 12, SCOPE)
    assert len(got) == 1 and got[0][0, 0, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert len(cache.match(a, 11, SCOPE)) == 2  # the limit caps it
    assert cache.match(a, 12, request_scope("shared", None, "tenant-b")) == []  # another salt: another key space
    assert (cache.hits, cache.misses) == (2, 1)


def test_lru_eviction_keeps_the_store_within_its_budget():
    cache = make_cache(block_tokens=4, blocks=3)
    read = lambda s, e: np.zeros((1, 2, 1, e - s, 1), np.float32)  # noqa: E731
    cache.store([1] * 8, 8, SCOPE, read)  # 2 blocks
    cache.match([1] * 8, 8, SCOPE)  # used: the most recent
    cache.store([2] * 8, 8, SCOPE, read)  # 2 more: one of the first must go... the least recently used
    assert cache.blocks == 3 and cache.bytes_used <= 3 * cache.block_bytes and cache.evictions == 1
    assert len(cache.match([1] * 8, 8, SCOPE)) == 0  # its first block was the least recently used one
    assert len(cache.match([2] * 8, 8, SCOPE)) == 2


def test_per_peer_scope_separates_clients_and_shared_does_not():
    class Peer:
        def __init__(self, uid=None, client_cert=None, address=""):
            self.uid, self.client_cert, self.address = uid, client_cert, address

    a, b = Peer(uid=1000), Peer(uid=1001)
    assert request_scope("per_peer", a, "") != request_scope("per_peer", b, "")
    assert request_scope("shared", a, "") == request_scope("shared", b, "")
    assert request_scope("per_peer", Peer(client_cert="CN=x"), "") != request_scope("per_peer", Peer(client_cert="CN=y"), "")
    assert request_scope("per_peer", Peer(address="10.0.0.1:5"), "") == request_scope("per_peer", Peer(address="10.0.0.1:6"), "")
    assert request_scope("off", a, "") is None


def test_config_section_is_validated():
    cfg = parse_config({"prefix_cache": {"scope": "per_peer", "block_tokens": 32, "warm": ["text", [{"role": "system", "content": "x"}]]}})
    assert cfg.prefix_cache.scope == "per_peer" and cfg.prefix_cache.block_tokens == 32
    for bad, words in [({"scope": "everyone"}, "must be one of"), ({"warm": [{"role": "user"}]}, "prefix_cache.warm[0]"),
                       ({"block_tokens": 1}, "at least"), ({"share": -0.1}, "at least"), ({"nope": 1}, "unknown key")]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
            parse_config({"prefix_cache": bad})


# ---- the engine, on the fake backend ----------------------------------------------------------------------
def test_a_repeated_prefix_is_copied_in_and_only_the_rest_prefilled():
    eng, clock = make_engine()
    prompt = list(range(1, 19))  # 18 tokens: 4 full blocks of 4
    first, r1 = cached_seq(prompt, 5, clock)
    eng.submit(first)
    run(eng, lambda: r1.finished)
    assert r1.finished.cached_prompt_tokens == 0 and eng.prefix_cache.blocks == 4
    before = eng.backend.prefilled_tokens
    eng.backend.cache.fill(-1)  # the freed slot forgets: only the copy can give the next request its prefix
    again, r2 = cached_seq([*prompt[:16], 50, 51], 5, clock)  # same 16 tokens, another ending
    eng.submit(again)
    run(eng, lambda: r2.finished)
    assert r2.finished.cached_prompt_tokens == 16
    assert eng.backend.prefilled_tokens - before == 2
    assert r2.tokens == alone([*prompt[:16], 50, 51], 5)  # the fake's logits depend on every cached token
    assert eng.metrics.prefix_cache_hits._value.get() == 1 and eng.metrics.prefix_cache_tokens._value.get() == 16


def test_a_whole_prompt_in_blocks_still_prefills_its_last_token():
    eng, clock = make_engine()
    prompt = list(range(1, 17))  # exactly 4 blocks
    for _ in range(2):
        s, rec = cached_seq(prompt, 3, clock)
        eng.submit(s)
        run(eng, lambda: rec.finished)
    assert rec.finished.cached_prompt_tokens == 12  # 3 blocks: the 4th holds the token whose logits are needed
    assert rec.tokens == alone(prompt, 3)


def test_requests_without_a_scope_neither_use_nor_fill_the_cache():
    eng, clock = make_engine()
    s, rec = seq(list(range(1, 19)), 3, clock)  # cache_scope None: the server's prefix_cache.scope off
    eng.submit(s)
    run(eng, lambda: rec.finished)
    assert eng.prefix_cache.blocks == 0 and eng.prefix_cache.misses == 0


def test_a_preempted_request_resumes_from_the_cached_prefix():
    eng, clock = make_engine(slots=1, chunk=4)
    prompt = list(range(1, 23))
    low, rl = cached_seq(prompt, 10, clock, priority=Priority.BACKGROUND)
    eng.submit(low)
    run(eng, lambda: len(rl.tokens) >= 3)
    high, rh = cached_seq([40, 41, 42], 4, clock, priority=Priority.INTERACTIVE)
    eng.submit(high)
    run(eng, lambda: rh.finished and rl.finished)
    assert rl.finished.preemptions == 1
    assert (0, 0, 4) in eng.backend.written and len(eng.backend.written) == 5  # its 5 prompt blocks copied back in
    assert rl.tokens == alone(prompt, 10)


def test_a_conversation_whose_slot_was_evicted_takes_its_history_from_the_cache():
    from daemon.sequence import Conversation

    eng, clock = make_engine(slots=1)
    conv = Conversation("c")
    t1, r1 = cached_seq(list(range(1, 14)), 4, clock, conversation=conv)
    eng.submit(t1)
    run(eng, lambda: r1.finished)
    other, ro = cached_seq([60, 61], 2, clock)
    eng.submit(other)
    run(eng, lambda: ro.finished)
    assert conv.evicted
    history = [*range(1, 14), *r1.tokens, 7]
    t2, r2 = cached_seq(history, 3, clock, conversation=conv)
    eng.submit(t2)
    run(eng, lambda: r2.finished)
    assert r2.finished.reprefilled and r2.finished.cached_prompt_tokens == 12  # the first prompt's 3 blocks
    assert r2.tokens == alone(history, 3)


def test_a_failed_copy_ends_that_request_alone():
    eng, clock = make_engine(slots=2)
    prompt = list(range(1, 19))
    s, rec = cached_seq(prompt, 3, clock)
    eng.submit(s)
    run(eng, lambda: rec.finished)

    def broken(slot, start, kv):
        raise OSError("copy failed")

    eng.backend.write_kv = broken
    a, ra = cached_seq(prompt, 3, clock)
    b, rb = cached_seq([70, 71, 72], 3, clock)
    eng.submit(a)
    eng.submit(b)
    run(eng, lambda: ra.finished and rb.finished)
    assert ra.finished.reason.value == "error" and "copying the cached prefix" in ra.finished.message
    assert rb.finished.reason.value == "length" and eng.scheduler.free_slots == [0, 1]


def test_under_pressure_no_request_fails_and_the_store_stays_in_budget():
    cache = make_cache(block_tokens=4, blocks=5)
    eng, clock = make_engine(slots=2, cache=cache)
    recs = []
    for i in range(12):  # 12 distinct 3-block prefixes, room for 5 blocks
        s, rec = cached_seq([i + 1] * 13, 2, clock)
        eng.submit(s)
        recs.append(rec)
        run(eng, lambda: rec.finished)
        assert cache.blocks <= 5 and cache.bytes_used <= 5 * cache.block_bytes
    assert all(r.finished.reason.value == "length" for r in recs)
    assert cache.evictions >= 12 * 3 - 5
    assert [r.tokens for r in recs[-2:]] == [alone([i + 1] * 13, 2) for i in (10, 11)]


# ---- snapshots --------------------------------------------------------------------------------------------
def filled_cache(tmp_path: Path, **kw) -> PrefixCache:
    cache = make_cache(snapshot_path=tmp_path / SNAPSHOT_NAME, max_disk_bytes=1 << 20, **kw)
    for i in range(3):
        cache.store([i + 1] * 8, 8, SCOPE,  # each position's "K/V": 10 x its position + the prompt's number
                    lambda s, e, i=i: (10 * np.arange(s, e, dtype=np.float32) + i).reshape(1, 1, 1, e - s, 1).repeat(2, 1),
                    proven=True)
    return cache


def test_snapshot_round_trip_keeps_blocks_and_their_order(tmp_path):
    cache = filled_cache(tmp_path)
    assert cache.save() and not cache.save()  # nothing new: nothing written
    assert (tmp_path / SNAPSHOT_NAME).stat().st_mode & 0o777 == 0o600
    back = make_cache(snapshot_path=tmp_path / SNAPSHOT_NAME, max_disk_bytes=1 << 20)
    assert back.load() == 6
    assert list(back._blocks) == list(cache._blocks)  # oldest first, as saved...
    got = back.match([2] * 8, 8, SCOPE)
    assert [b[0, 0, 0, :, 0].tolist() for b in got] == [[1, 11, 21, 31], [41, 51, 61, 71]]
    small = make_cache(blocks=2, snapshot_path=tmp_path / SNAPSHOT_NAME, max_disk_bytes=1 << 20)
    assert small.load() == 2 and len(small.match([3] * 8, 8, SCOPE)) == 2  # ...so the most recent are kept


def test_corrupt_or_foreign_snapshots_are_skipped_with_a_log_line(tmp_path, caplog):
    path = tmp_path / SNAPSHOT_NAME
    filled_cache(tmp_path).save()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    fresh = make_cache(snapshot_path=path, max_disk_bytes=1 << 20)
    assert fresh.load() == 0 and fresh.blocks == 0
    assert "checksum does not match" in caplog.text
    filled_cache(tmp_path).save()
    other = PrefixCache(namespace("another-bundle", LAYOUT, 4), LAYOUT, 4, 1 << 20, path, 1 << 20)
    assert other.load() == 0 and "another bundle or KV layout" in caplog.text
    path.write_bytes(b"garbage")
    assert fresh.load() == 0 and "not a prefix cache snapshot" in caplog.text
    filled_cache(tmp_path).save()
    path.write_bytes(path.read_bytes()[:-100])  # torn: a crash mid-write without the rename would not do this
    assert fresh.load() == 0 and "a torn file" in caplog.text


def test_only_blocks_that_served_a_hit_go_to_disk(tmp_path):
    cache = make_cache(snapshot_path=tmp_path / SNAPSHOT_NAME, max_disk_bytes=1 << 20)
    read = lambda s, e: np.zeros((1, 2, 1, e - s, 1), np.float32)  # noqa: E731
    cache.store([1] * 8, 8, SCOPE, read)
    cache.store([2] * 8, 8, SCOPE, read)
    assert not cache.save() and not (tmp_path / SNAPSHOT_NAME).exists()  # one-off prompts: nothing to write
    assert len(cache.match([2] * 6, 6, SCOPE)) == 1  # a hit on the first block of [2] * 8
    assert cache.save()
    back = make_cache(snapshot_path=tmp_path / SNAPSHOT_NAME, max_disk_bytes=1 << 20)
    assert back.load() == 1 and len(back.match([2] * 8, 8, SCOPE)) == 1


def test_snapshot_respects_max_disk_bytes(tmp_path):
    cache = filled_cache(tmp_path)
    cache.max_disk_bytes = 4096 + 2 * (16 + cache.block_bytes)
    cache.save()
    back = make_cache(snapshot_path=tmp_path / SNAPSHOT_NAME, max_disk_bytes=cache.max_disk_bytes)
    assert back.load() == 2 and len(back.match([3] * 8, 8, SCOPE)) == 2  # the two most recent


def test_snapshot_writer_writes_at_stop_and_folder_is_private(tmp_path):
    cfg = parse_config({"prefix_cache": {"dir": str(tmp_path / "pc"), "block_tokens": 8}}).prefix_cache
    cache = create_prefix_cache(cfg, "bundle-x", LAYOUT, 1 << 20)
    assert cache.snapshot_path == tmp_path / "pc" / SNAPSHOT_NAME
    assert (tmp_path / "pc").stat().st_mode & 0o777 == 0o700
    writer = SnapshotWriter(cache, 3600)
    writer.start()
    cache.store([1] * 8, 8, SCOPE, lambda s, e: np.zeros((1, 2, 1, e - s, 1), np.float32), proven=True)
    writer.stop()
    assert cache.snapshot_path.exists() and not [p for p in (tmp_path / "pc").iterdir() if p.name.startswith(".")]


# ---- real CPU graphs: copied blocks + the rest give the logits of a full prefill ---------------------------
VARIANTS = ["llama", "llama3_rope", "llama_linear_rope", "llama_tied", "mistral", "mistral_swa", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", VARIANTS)
def test_copied_blocks_then_rest_match_a_full_prefill(tmp_path, arch):
    from daemon.backend_onnx import OnnxBackend
    from test_graph_parity import MAX_SEQ as GRAPH_SEQ
    from test_graph_parity import build

    spec, path = build(tmp_path, arch, "cpu")
    layout = KvCacheLayout(spec.num_layers, spec.num_kv_heads, GRAPH_SEQ, spec.head_dim, "float32")
    backend = OnnxBackend(path, layout, spec.vocab_size, slots=3, threads=1)
    cache = PrefixCache(namespace(arch, layout, 16), layout, 16, 1 << 24)
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, spec.vocab_size, 40).tolist()
    full = backend.prefill(0, prompt, 0).copy()
    # Another request with the same first 32 tokens fills the cache (prefilled in two chunks, as the engine may).
    other = [*prompt[:32], *rng.integers(3, spec.vocab_size, 5).tolist()]
    backend.prefill(1, other[:20], 0)
    backend.prefill(1, other[20:], 20)
    assert cache.store(other, len(other), SCOPE, lambda s, e: backend.read_kv(1, s, e)) == 2
    blocks = cache.match(prompt, len(prompt) - 1, SCOPE)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        backend.write_kv(2, 16 * i, block)
    restored = backend.prefill(2, prompt[32:], 32)
    np.testing.assert_allclose(restored, full, rtol=0, atol=1e-4)
    # And the decode steps after it: the same greedy tokens, close logits.
    a, b = [int(full.argmax())], [int(restored.argmax())]
    for step in range(4):
        la = backend.decode([0], [a[-1]], [40 + step])[0].copy()
        lb = backend.decode([2], [b[-1]], [40 + step])[2]
        np.testing.assert_allclose(lb, la, rtol=0, atol=1e-4)
        a.append(int(la.argmax()))
        b.append(int(lb.argmax()))
    assert a == b


# ---- real daemons -----------------------------------------------------------------------------------------
class PersistentDaemon(DaemonThread):
    """A DaemonThread whose prefix cache is made as run_daemon makes it: snapshot loaded, warm prompts prefilled."""

    def start(self) -> "PersistentDaemon":
        from daemon.backend_onnx import create_cpu_backend
        from daemon.lifecycle import Daemon, prepare_prefix_cache, warm_up
        from daemon.tokenizer import Tokenizer

        self._thread.start()
        tokenizer = Tokenizer.from_dir(self.bundle.path, extra_eos_ids=self.bundle.model["eos_token_ids"])
        backend = create_cpu_backend(self.bundle, self.config.engine.slots, threads=1)
        warm_up(backend, self.config.engine.slots)
        cache = prepare_prefix_cache(self.config, self.bundle, backend, tokenizer)
        self.daemon = Daemon(self.config, self.bundle, tokenizer, backend, prefix_cache=cache)
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(30)
        return self


def daemon_config(tmp_path: Path, **prefix) -> dict:
    return {"listen": {"unix": str(tmp_path / "edgellm.sock")}, "engine": {"slots": 2},
            "prefix_cache": {"block_tokens": 16, "dir": str(tmp_path / "prefix"), **prefix}}


PROMPT = list(range(5, 65))  # 60 tokens: 3 blocks of 16 reusable (the last token is always prefilled)


def test_daemon_reuses_a_prompt_across_requests_with_the_same_output(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, daemon_config(tmp_path)).start()
    try:
        stub = d.stub()
        cold = generate(stub, token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True)
        # Another prompt in between overwrites the slot: only the copy can give the next request its prefix.
        generate(stub, token_ids=pb.TokenIds(ids=[p + 100 for p in PROMPT]), max_new_tokens=1)
        warm = generate(stub, token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True)
        assert cold[2].usage.cached_prompt_tokens == 0 and warm[2].usage.cached_prompt_tokens == 48
        assert warm[0] == cold[0]
        salted = generate(stub, token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True, cache_salt="t1")
        assert salted[2].usage.cached_prompt_tokens == 0  # another salt: the shared blocks are not its
        again = generate(stub, token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True, cache_salt="t1")
        assert again[2].usage.cached_prompt_tokens == 48 and again[0] == cold[0]
        m = d.engine.metrics
        assert m.prefix_cache_hits._value.get() == 2 and m.prefix_cache_misses._value.get() == 3
        assert m.prefix_cache_tokens._value.get() == 96
        with pytest.raises(grpc.RpcError) as e:
            generate(stub, token_ids=pb.TokenIds(ids=PROMPT), cache_salt="s" * 257)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in e.value.details()
    finally:
        d.stop()
    assert not (tmp_path / "prefix").exists()  # a daemon not started by run_daemon keeps its cache in memory


def test_an_int8_kv_cache_is_copied_in_and_out_as_it_is(tiny_checkpoint, tmp_path):
    """A bundle built with `--kv-cache int8`: the cache keeps the int8 bytes the prefill wrote, and a request
    that restores them gets the cold request's output."""
    from build_engine.build import build_bundle

    bundle = build_bundle(tiny_checkpoint, tmp_path / "kv8", precision="int8", context_length=128, kv_cache="int8")
    d = DaemonThread(bundle, daemon_config(tmp_path)).start()
    try:
        stub = d.stub()
        cold = generate(stub, token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True)
        blocks = d.daemon.prefix_cache.match(PROMPT, 59, SCOPE)
        assert len(blocks) == 3 and {b.dtype for b in blocks} == {np.dtype(np.int8)}
        cached = np.concatenate(blocks, axis=3)  # [layers, K/V, kv_heads, 48, head_dim]
        backend = d.engine.backend
        assert cached.any() and any(np.array_equal(backend.read_kv(s, 0, 48), cached) for s in range(2))
        generate(stub, token_ids=pb.TokenIds(ids=[p + 100 for p in PROMPT]), max_new_tokens=1)  # takes the slot
        warm = generate(stub, token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True)
        # Greedy, not a near-tie: along these 8 tokens the top two logits stay >= 0.018 apart (measured, x86-64),
        # and the restored path's logits equal the cold ones (difference 0 there; a different CPU's kernels move
        # both paths alike, by far less than that margin).
        assert warm[2].usage.cached_prompt_tokens == 48 and warm[0] == cold[0]
    finally:
        d.stop()


def test_scope_off_disables_the_cache(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, daemon_config(tmp_path, scope="off")).start()
    try:
        for _ in range(2):
            _, _, fin = generate(d.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=2)
            assert fin.usage.cached_prompt_tokens == 0
        assert d.daemon.prefix_cache is None
    finally:
        d.stop()


def test_per_peer_scope_reuses_a_clients_own_prompts(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, daemon_config(tmp_path, scope="per_peer")).start()
    try:
        runs = [generate(d.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=4, ignore_eos=True)
                for _ in range(2)]  # two connections of the same Unix user: the same peer
        assert [r[2].usage.cached_prompt_tokens for r in runs] == [0, 48] and runs[0][0] == runs[1][0]
        uid = request_scope("per_peer", type("Peer", (), {"uid": os.getuid()})(), "")
        assert len(d.daemon.prefix_cache.match(PROMPT, 59, uid)) == 3  # keyed by the peer's uid...
        assert d.daemon.prefix_cache.match(PROMPT, 59, SCOPE) == []  # ...not in the shared scope
    finally:
        d.stop()


def test_the_cache_survives_a_restart(tiny_bundle, tmp_path):
    first = PersistentDaemon(tiny_bundle, daemon_config(tmp_path, save_interval_s=3600)).start()
    try:
        cold = generate(first.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True)
        # A second use proves the blocks worth keeping on disk (a one-off prompt's are not written).
        generate(first.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=1)
    finally:
        first.stop()  # writes the snapshot
    snapshot = tmp_path / "prefix" / SNAPSHOT_NAME
    assert snapshot.exists() and (tmp_path / "prefix").stat().st_mode & 0o777 == 0o700
    second = PersistentDaemon(tiny_bundle, daemon_config(tmp_path)).start()
    try:
        assert second.daemon.prefix_cache.blocks == 3
        warm = generate(second.stub(), token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=8, ignore_eos=True)
        assert warm[2].usage.cached_prompt_tokens == 48 and warm[0] == cold[0]
    finally:
        second.stop()


def test_warm_prompts_are_cached_before_serving(tiny_bundle, tmp_path):
    from daemon.tokenizer import Tokenizer

    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    system = [{"role": "system", "content": text}]
    d = PersistentDaemon(tiny_bundle, daemon_config(tmp_path, warm=[text, system], persist=False, share=2.0)).start()
    try:
        tokenizer = Tokenizer.from_dir(tiny_bundle)
        n = len(tokenizer.encode(text))
        n_chat = len(tokenizer.encode_chat([("system", text)]))
        assert n > 32 and d.daemon.prefix_cache.blocks == n // 16 + n_chat // 16
        _, _, fin = generate(d.stub(), chat=pb.ChatMessages(messages=[pb.ChatMessage(role="system", content=text),
                                                                     pb.ChatMessage(role="user", content="hi")]),
                             max_new_tokens=2)
        assert fin.usage.cached_prompt_tokens >= 16  # the system message's blocks
        _, _, fin = generate(d.stub(), text=text, max_new_tokens=2)
        assert fin.usage.cached_prompt_tokens == min(n // 16, (n - 1) // 16) * 16 > 0
    finally:
        d.stop()
    assert not (tmp_path / "prefix").exists()  # persist: false


# ---- the TensorRT backend's copies: their addressing as plain arithmetic (tests/gpu runs the real copies) -------
def apply_copies(plan, buffers: dict, row_bytes: int, host: np.ndarray, to_host: bool) -> None:
    """Carry out kv_copy_plan's 2D copies with numpy on byte arrays that stand for the device buffers, as
    cuMemcpy2D defines a copy: `rows` rows of `width` bytes, each side's rows its pitch apart."""
    for c in plan:
        device = buffers[c.layer, c.kv]
        block = host[c.layer, c.kv].reshape(-1).view(np.uint8)
        for r in range(c.rows):
            d = device[c.device_offset + r * c.device_pitch:][:c.width]
            h = block[r * c.host_pitch:][:c.width]
            (h if to_host else d)[:] = d if to_host else h


def test_tensorrt_block_copies_address_the_right_positions():
    from daemon.backend_trt import kv_copy_plan
    from daemon.prefix_cache import block_shape

    layout = KvCacheLayout(num_layers=2, num_kv_heads=3, max_seq=24, head_dim=4, dtype="float16")
    slots, row_bytes = 3, 3 * 24 * 4 * 2 + 256  # rows padded as an aligned layout may pad them
    rng = np.random.default_rng(0)
    buffers = {(i, kv): rng.integers(0, 256, slots * row_bytes, dtype=np.uint8) for i in range(2) for kv in (0, 1)}

    def cache(i, kv):  # [slots, kv_heads, max_seq, head_dim] over a slot's row, padding left out
        rows = buffers[i, kv].reshape(slots, row_bytes)[:, :3 * 24 * 4 * 2]
        return rows.view(np.float16).reshape(slots, 3, 24, 4)

    kv = np.empty(block_shape(layout, 8), layout.np_dtype)
    apply_copies(kv_copy_plan(layout, row_bytes, 1, 5, 8), buffers, row_bytes, kv, to_host=True)
    for i in range(2):
        np.testing.assert_array_equal(kv[i, 0], cache(i, 0)[1, :, 5:13])
        np.testing.assert_array_equal(kv[i, 1], cache(i, 1)[1, :, 5:13])
    before = {k: b.copy() for k, b in buffers.items()}
    apply_copies(kv_copy_plan(layout, row_bytes, 2, 16, 8), buffers, row_bytes, kv, to_host=False)
    for i in range(2):
        for k in (0, 1):
            np.testing.assert_array_equal(cache(i, k)[2, :, 16:24], kv[i, k])
            written = np.zeros((slots, row_bytes), bool)
            written[2, :3 * 24 * 4 * 2].reshape(3, 24, 8)[:, 16:24] = True
            np.testing.assert_array_equal(buffers[i, k][~written.reshape(-1)], before[i, k][~written.reshape(-1)])


def test_edgellm_serve_restores_its_snapshot_before_ready_and_skips_a_corrupt_one(tiny_bundle):
    """Real `edgellm serve` processes: the snapshot written at SIGTERM is loaded by the next start before READY=1."""
    import shutil
    import tempfile

    from edgellm.client import Client
    from test_startup_faults import Serve

    folder = Path(tempfile.mkdtemp(prefix="elp-", dir="/tmp"))  # short: a Unix socket path
    try:
        config = folder / "edgellm.yaml"
        config.write_text(f"prefix_cache:\n  block_tokens: 16\n  dir: {folder / 'pc'}\n")
        sock = folder / "s.sock"
        args = ["--bundle", str(tiny_bundle), "--config", str(config), "--unix", str(sock), "--log-level", "info"]

        def ask() -> tuple[list[int], int]:
            with Client(f"unix:{sock}") as client:
                ids, _, fin = generate(client.stub, token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=6,
                                       ignore_eos=True)
            return ids, fin.usage.cached_prompt_tokens

        first = Serve(folder, args)
        first.wait_ready()
        cold, hit = ask(), ask()
        assert first.stop() == 0, first.log()
        assert cold[1] == 0 and hit == (cold[0], 48)
        assert "prefix cache: wrote 3 blocks" in first.log()

        second = Serve(folder, args)
        second.wait_ready()
        assert ask() == (cold[0], 48)  # the first request after the restart
        assert second.stop() == 0 and "prefix cache: restored 3 blocks" in second.log()

        snapshot = folder / "pc" / SNAPSHOT_NAME
        data = bytearray(snapshot.read_bytes())
        data[-40] ^= 0xFF
        snapshot.write_bytes(bytes(data))
        third = Serve(folder, args)
        third.wait_ready()
        assert ask() == (cold[0], 0)
        assert third.stop() == 0 and "skipping the snapshot" in third.log() and "checksum" in third.log()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
