"""The prefix cache: K/V of prompt blocks kept in host memory by content, reused by any later prompt that starts the same.

A prompt is cut into blocks of `block_tokens` tokens. Each full block's key is a chain hash: the hash of the
previous block's key and this block's token ids, the first seeded with the namespace (bundle id, KV layout,
block size) and the request's scope (peer and salt, see docs/prefix-cache.md). So a key names the whole prefix up
to its block's end, and equal keys mean equal K/V. A block holds the K/V of its positions as one host array
[layers, 2 (K, V), kv_heads, block_tokens, head_dim], copied out of a slot after a prefill (Backend.read_kv) and
into another slot before one (Backend.write_kv). Blocks live in one LRU map bounded in bytes.

The engine thread looks up and stores; a snapshot writer thread (or the daemon at its stop) copies the map's
entries under the lock and writes them to disk without it. Blocks are never changed once stored, so a snapshot
shares them and writes no torn block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import tempfile
import threading
import time
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from bundle_format.kv_cache import KvCacheLayout

if TYPE_CHECKING:
    from daemon.backend import Backend
    from daemon.config import PrefixCacheConfig
    from daemon.metrics import EngineMetrics
    from daemon.tokenizer import Tokenizer

log = logging.getLogger("edgellm.prefix_cache")

KEY_BYTES = 16
SNAPSHOT_MAGIC = b"EDGELLM-PREFIX-CACHE\n"
SNAPSHOT_VERSION = 1
SNAPSHOT_NAME = "prefix-cache.snapshot"
def block_shape(layout: KvCacheLayout, tokens: int) -> tuple[int, int, int, int, int]:
    """The host array of `tokens` positions of one slot: [layers, 2 (K, V), kv_heads, tokens, head_dim]."""
    return (layout.num_layers, 2, layout.num_kv_heads, tokens, layout.head_dim)


def namespace(bundle_id: str, layout: KvCacheLayout, block_tokens: int) -> bytes:
    """What every key of this daemon's cache is seeded with: K/V from another model or layout never match."""
    return json.dumps({"bundle_id": bundle_id, "layers": layout.num_layers, "kv_heads": layout.num_kv_heads,
                       "head_dim": layout.head_dim, "dtype": layout.dtype, "block_tokens": block_tokens},
                      sort_keys=True).encode()


class PrefixCache:
    """Blocks of prompt K/V by chain-hash key, least recently used evicted first, within max_bytes."""

    def __init__(self, space: bytes, layout: KvCacheLayout, block_tokens: int, max_bytes: int,
                 snapshot_path: Path | None = None, max_disk_bytes: int = 0):
        self.space = space
        self.layout = layout
        self.block_tokens = block_tokens
        self.block_shape = block_shape(layout, block_tokens)
        self.block_dtype = layout.np_dtype
        self.block_bytes = int(np.prod(self.block_shape)) * self.block_dtype.itemsize
        self.max_blocks = max_bytes // self.block_bytes
        self.snapshot_path = snapshot_path
        self.max_disk_bytes = max_disk_bytes
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()  # oldest first
        self._lock = threading.Lock()  # the map: the engine thread changes it, a snapshot copies it
        # Blocks that served a hit (or came from a snapshot or a warm prompt): only these are written to disk. A
        # one-off prompt's blocks stay in memory, so a device whose every request differs past its system prompt
        # does not rewrite its snapshot (and wear its flash) for blocks that are never reused.
        self._proven: set[bytes] = set()
        self.generation = 0  # bumped when a block is first proven: a snapshot is due when it moved
        self._saved_generation = 0
        self.hits = self.misses = self.evictions = self.hit_tokens = 0
        self._metrics: EngineMetrics | None = None

    # ---- sizes ----------------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return len(self._blocks)

    @property
    def bytes_used(self) -> int:
        return len(self._blocks) * self.block_bytes

    def bind_metrics(self, metrics: "EngineMetrics") -> None:
        self._metrics = metrics
        metrics.bind_prefix_cache(lambda: self.bytes_used, lambda: self.blocks)

    # ---- keys -----------------------------------------------------------------------------------------
    def keys(self, ids: Sequence[int], tokens: int, scope: bytes) -> Iterator[bytes]:
        """Chain keys of the full blocks within the first `tokens` of ids, in order."""
        h = hashlib.blake2b(self.space + b"\0" + scope, digest_size=KEY_BYTES).digest()
        b = self.block_tokens
        for start in range(0, tokens - b + 1, b):
            h = hashlib.blake2b(h + array("q", ids[start:start + b]).tobytes(), digest_size=KEY_BYTES).digest()
            yield h

    # ---- the engine thread ----------------------------------------------------------------------------
    def match(self, ids: Sequence[int], limit: int, scope: bytes) -> list[np.ndarray]:
        """The longest run of cached blocks that ids start with, within its first `limit` tokens (marked used)."""
        found = []
        with self._lock:
            for key in self.keys(ids, limit, scope):
                block = self._blocks.get(key)
                if block is None:
                    break
                self._blocks.move_to_end(key)
                found.append(block)
                if key not in self._proven:
                    self._proven.add(key)
                    self.generation += 1
        if found:
            self.hits += 1
            self.hit_tokens += len(found) * self.block_tokens
        else:
            self.misses += 1
        if self._metrics is not None:
            (self._metrics.prefix_cache_hits if found else self._metrics.prefix_cache_misses).inc()
            self._metrics.prefix_cache_tokens.inc(len(found) * self.block_tokens)
        return found

    def store(self, ids: Sequence[int], tokens: int, scope: bytes, read: Callable[[int, int], np.ndarray],
              proven: bool = False) -> int:
        """Keep the full blocks within the first `tokens` of ids that are not cached yet, read(start, end) giving
        their K/V (fresh host arrays); returns how many were added. `proven`: worth a place on disk already."""
        if self.max_blocks == 0:
            return 0
        keys = list(self.keys(ids, tokens, scope))
        with self._lock:
            missing = [i for i, k in enumerate(keys) if k not in self._blocks]
            for k in keys:  # the prefix just used stays the most recent
                if k in self._blocks:
                    self._blocks.move_to_end(k)
        if not missing:
            return 0
        b = self.block_tokens
        # One array per block (one copy out of the slot): an evicted block frees its own bytes.
        return sum(self._insert(keys[i], read(i * b, (i + 1) * b), proven) for i in missing)

    def _insert(self, key: bytes, block: np.ndarray, proven: bool) -> int:
        with self._lock:
            if key in self._blocks:
                return 0
            while len(self._blocks) >= self.max_blocks:
                old, _ = self._blocks.popitem(last=False)
                self._proven.discard(old)
                self.evictions += 1
                if self._metrics is not None:
                    self._metrics.prefix_cache_evictions.inc()
            self._blocks[key] = block
            if proven:
                self._proven.add(key)
                self.generation += 1
        return 1

    # ---- snapshots (any thread but the engine's) ------------------------------------------------------
    def save(self) -> bool:
        """Write the proven blocks (the most recent first within max_disk_bytes) to snapshot_path, atomically; whether
        anything was written (nothing is when no block came since the last save)."""
        if self.snapshot_path is None:
            return False
        with self._lock:
            generation = self.generation
            if generation == self._saved_generation:
                return False
            entries = [(k, b) for k, b in self._blocks.items() if k in self._proven]  # oldest first
        room = max(self.max_disk_bytes - 4096, 0) // (KEY_BYTES + self.block_bytes)
        entries = entries[-room:] if room else []
        started = time.monotonic()
        write_snapshot(self.snapshot_path, self.space, self.block_shape, self.block_dtype, entries)
        self._saved_generation = generation
        log.info("prefix cache: wrote %d blocks (%.1f MiB) to %s in %.2fs", len(entries),
                 len(entries) * self.block_bytes / 2**20, self.snapshot_path, time.monotonic() - started)
        return True

    def load(self) -> int:
        """Take the blocks of the snapshot at snapshot_path, if it is sound and this cache's; how many were taken.
        A missing file is no news; a corrupt, foreign or oversized one is skipped with a log line."""
        path = self.snapshot_path
        if path is None or not path.exists():
            return 0
        started = time.monotonic()
        try:
            entries = read_snapshot(path, self.space, self.block_shape, self.block_dtype,
                                    max(self.max_disk_bytes, 4096) + 4096)
        except SnapshotError as e:
            log.warning("prefix cache: skipping the snapshot %s: %s", path, e)
            return 0
        taken = 0
        for key, block in entries[-self.max_blocks:] if self.max_blocks else []:
            taken += self._insert(key, block, proven=True)
        with self._lock:
            self._saved_generation = self.generation  # what is on disk already
        log.info("prefix cache: restored %d blocks (%d tokens, %.1f MiB) from %s in %.2fs", taken,
                 taken * self.block_tokens, taken * self.block_bytes / 2**20, path, time.monotonic() - started)
        return taken


class SnapshotError(Exception):
    """A snapshot file that is not sound or not this cache's."""


def write_snapshot(path: Path, space: bytes, shape: tuple[int, ...], dtype: np.dtype,
                   entries: list[tuple[bytes, np.ndarray]]) -> None:
    """magic, header length (u32 LE), JSON header, then per block its key and raw K/V, then the SHA-256 of all
    before it; written to a temporary file in the same folder, fsynced, renamed over path, the folder fsynced."""
    header = json.dumps({"version": SNAPSHOT_VERSION, "namespace": space.decode(), "block_shape": list(shape),
                         "dtype": dtype.name, "blocks": len(entries)}).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".snapshot-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            digest = hashlib.sha256()

            def put(data: bytes | memoryview) -> None:
                digest.update(data)
                f.write(data)

            put(SNAPSHOT_MAGIC + struct.pack("<I", len(header)) + header)
            for key, block in entries:
                put(key)
                put(memoryview(np.ascontiguousarray(block)).cast("B"))
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_snapshot(path: Path, space: bytes, shape: tuple[int, ...], dtype: np.dtype,
                  max_bytes: int) -> list[tuple[bytes, np.ndarray]]:
    """The (key, block) entries of a snapshot, oldest first; SnapshotError if it is not sound or not for this cache.
    Each block is read straight into its own array (one copy, no second buffer of the whole file)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise SnapshotError(f"{size} bytes, more than prefix_cache.max_disk_bytes allows")
            return _read_entries(f, size, space, shape, dtype)
    except OSError as e:
        raise SnapshotError(f"cannot read it: {e.strerror or e}") from None


def _read_entries(f, size: int, space: bytes, shape: tuple[int, ...], dtype: np.dtype) -> list[tuple[bytes, np.ndarray]]:
    digest = hashlib.sha256()

    def take(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise SnapshotError("it is shorter than its header says (a torn file)")
        digest.update(data)
        return data

    head = f.read(len(SNAPSHOT_MAGIC) + 4)
    if len(head) != len(SNAPSHOT_MAGIC) + 4 or not head.startswith(SNAPSHOT_MAGIC):
        raise SnapshotError("not a prefix cache snapshot")
    digest.update(head)
    (header_len,) = struct.unpack_from("<I", head, len(SNAPSHOT_MAGIC))
    if header_len > 65536:
        raise SnapshotError("its header is too long")
    try:
        header = json.loads(take(header_len))
    except (ValueError, SnapshotError):
        raise SnapshotError("its header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"format version {header.get('version') if isinstance(header, dict) else None!r}, "
                            f"this daemon reads {SNAPSHOT_VERSION}")
    if header.get("namespace") != space.decode() or header.get("block_shape") != list(shape) \
            or header.get("dtype") != dtype.name:
        raise SnapshotError(f"written for another bundle or KV layout ({header.get('namespace')})")
    block_bytes = int(np.prod(shape)) * dtype.itemsize
    count = header.get("blocks")
    if not isinstance(count, int) or size != len(head) + header_len + count * (KEY_BYTES + block_bytes) + 32:
        raise SnapshotError("its length does not match its header (a torn file)")
    entries = []
    for _ in range(count):
        key = take(KEY_BYTES)
        block = np.empty(shape, dtype)
        raw = memoryview(block).cast("B")
        if f.readinto(raw) != block_bytes:
            raise SnapshotError("it is shorter than its header says (a torn file)")
        digest.update(raw)
        entries.append((key, block))
    if f.read(32) != digest.digest():
        raise SnapshotError("its checksum does not match (a torn or changed file)")
    return entries


class SnapshotWriter:
    """A thread that writes the cache's snapshot every interval_s when blocks came since the last one."""

    def __init__(self, cache: PrefixCache, interval_s: float):
        self.cache = cache
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgellm-prefix-snapshot", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.save()

    def save(self) -> None:
        try:
            self.cache.save()
        except Exception as e:  # a full disk must not stop serving: the next save tries again
            log.warning("prefix cache: writing the snapshot failed: %s: %s", type(e).__name__, e)

    def stop(self) -> None:
        """Stop the thread, then write a last snapshot if blocks came since the last one."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.save()


# ---- set-up: the daemon's cache from its config -----------------------------------------------------------
def default_dir(bundle_id: str) -> Path:
    """cache_home() / prefix-cache / <bundle id>."""
    from daemon.config import cache_home

    safe = bundle_id if bundle_id.replace("-", "").replace("_", "").replace(".", "").isalnum() \
        else hashlib.sha256(bundle_id.encode()).hexdigest()[:32]
    return cache_home() / "prefix-cache" / safe


def private_folder(folder: Path) -> Path:
    """folder, made (0700) if missing; one that is not a folder of this user's is refused (OSError)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{folder} is not a folder of this user's")
    if st.st_mode & 0o077:
        folder.chmod(0o700)  # the snapshot holds what prompts said, in a form a reader can turn back into them
    return folder


def create_prefix_cache(cfg: "PrefixCacheConfig", bundle_id: str, layout: KvCacheLayout, kv_cache_bytes: int,
                        persist: bool = True) -> PrefixCache | None:
    """The daemon's prefix cache as configured (None when off); with a snapshot file when `persist` and
    prefix_cache.persist say so and its folder can be made private (else a log line, and memory only)."""
    if not cfg.enabled or cfg.scope == "off":
        return None
    max_bytes = cfg.max_bytes or int(cfg.share * kv_cache_bytes)
    snapshot = None
    if persist and cfg.persist:
        folder = Path(cfg.dir) if cfg.dir else default_dir(bundle_id)
        try:
            snapshot = private_folder(folder) / SNAPSHOT_NAME
        except OSError as e:
            log.warning("prefix cache: not persisted: cannot use the folder %s: %s", folder, e.strerror or e)
    cache = PrefixCache(namespace(bundle_id, layout, cfg.block_tokens), layout, cfg.block_tokens, max_bytes,
                        snapshot, cfg.max_disk_bytes or max_bytes)
    if cache.max_blocks == 0:
        log.warning("prefix cache: %d bytes hold no block of %d bytes: nothing will be cached", max_bytes,
                    cache.block_bytes)
    else:
        log.info("prefix cache: up to %d blocks of %d tokens (%.1f MiB), scope %s%s", cache.max_blocks,
                 cfg.block_tokens, cache.max_blocks * cache.block_bytes / 2**20, cfg.scope,
                 f", snapshot {snapshot}" if snapshot else "")
    return cache


MAX_SALT_CHARS = 256


def request_scope(scope: str, peer: object | None, salt: str) -> bytes | None:
    """What a request's keys are seeded with besides the namespace: under per_peer the client's identity (its Unix
    uid, else its verified client certificate, else its TCP host), and the request's cache_salt. None: no cache."""
    if scope == "off":
        return None
    who = peer_identity(peer) if scope == "per_peer" else ""
    return json.dumps([who, salt]).encode()


def peer_identity(peer: object | None) -> str:
    if peer is None:
        return ""
    if getattr(peer, "uid", None) is not None:
        return f"uid:{peer.uid}"
    if getattr(peer, "client_cert", None):
        return f"cert:{peer.client_cert}"
    address = getattr(peer, "address", "")
    return f"host:{address.rpartition(':')[0] or address}"


def restore_blocks(backend: "Backend", slot: int, blocks: list[np.ndarray]) -> int:
    """Copy cached blocks into positions 0.. of a slot; the positions they fill."""
    at = 0
    for block in blocks:
        backend.write_kv(slot, at, block)
        at += block.shape[3]
    return at


def warm_prompts(cache: PrefixCache, backend: "Backend", tokenizer: "Tokenizer", prompts: list,
                 context_length: int) -> tuple[int, int]:
    """Prefill each configured prompt's full blocks that the cache lacks (in slot 0, before the engine runs) and
    keep them, in the shared scope; returns (prompts, tokens prefilled)."""
    scope = request_scope("shared", None, "")
    prefilled = 0
    for i, prompt in enumerate(prompts):
        try:
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt)
            else:
                ids = tokenizer.encode_chat([(m["role"], m["content"]) for m in prompt])
        except ValueError as e:  # the chat template refuses the messages: the config's fault, named
            raise ValueError(f"prefix_cache.warm[{i}]: {e}") from None
        ids = ids[:context_length - 1]
        full = len(ids) // cache.block_tokens * cache.block_tokens
        if full == 0:
            log.warning("prefix cache: a warm prompt of %d tokens fills no block of %d: skipped", len(ids),
                        cache.block_tokens)
            continue
        at = restore_blocks(backend, 0, cache.match(ids, full, scope))
        if at < full:
            backend.prefill(0, ids[at:full], at)
            prefilled += full - at
            cache.store(ids, full, scope, lambda start, end: backend.read_kv(0, start, end), proven=True)
    return len(prompts), prefilled
