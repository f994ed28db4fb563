"""The engine bundle: a folder with `manifest.yaml`, the graph (or engine), its weights and the tokenizer.

This module owns the on-disk format: the build step writes it (build_engine/bundle_writer.py) and the
daemon loads it with load_bundle, which refuses any bundle whose files do not match the checksums in its manifest,
or that names a file outside its folder (signatures: bundle_format/signature.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bundle_format.kv_cache import KV_DTYPES, KvCacheLayout
from bundle_format.onnx_external import MalformedGraph, external_data_locations

MANIFEST_NAME = "manifest.yaml"
# 2: CPU bundles carry the GroupQueryAttention graph (build_engine/cpu_graph.py); 3: its tokens are packed
# (input_ids [1, tokens], token_rows, token_places), so one step mixes decode rows and prompt chunks.
FORMAT_VERSION = 3
# What every reader of a manifest relies on (the manifest has no checksum of its own: an edit is caught here).
_REQUIRED_KEYS = {"model": ("architecture", "vocab_size"), "graph": ("file", "kv_cache")}


class BundleError(Exception):
    """A bundle that cannot be used; the message says which file and why."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    # The manifest exactly as read: the bytes a signature covers are the bytes that were parsed.
    manifest_bytes: bytes = field(default=b"", repr=False, compare=False)

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest["graph"]["file"]

    @property
    def kv_cache(self) -> KvCacheLayout:
        kv = self.manifest["graph"]["kv_cache"]
        return KvCacheLayout(kv["num_layers"], kv["num_kv_heads"], kv["max_seq"], kv["head_dim"], kv["dtype"])

    @property
    def context_length(self) -> int:
        """Tokens a request may span: the cache's last position is kept as the write sink of idle rows."""
        return self.kv_cache.max_seq - 1


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest, check that every file it names stays inside the bundle, and (by default)
    check every file against its sha256.

    A path through a symbolic link (a `current` link that an update swaps) is resolved once, here: every file of
    the bundle is then read from the one folder the link named at this moment, even if it is swapped meanwhile."""
    path = Path(os.path.realpath(path))
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing (is {path} an edgellm bundle?)")
    raw = manifest_path.read_bytes()
    try:
        # The C loader when PyYAML has it: parsing the manifest counts at daemon start (docs/bundles.md).
        manifest = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise BundleError(f"{manifest_path}: not valid YAML: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{manifest_path}: not an edgellm manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format version {version!r}, this edgellm reads {FORMAT_VERSION}; rebuild the bundle")
    for section, keys in _REQUIRED_KEYS.items():
        value = manifest.get(section)
        missing = [k for k in keys if k not in value] if isinstance(value, dict) else [""]
        if missing:
            raise BundleError(f"{manifest_path}: no {section}{'.' + missing[0] if missing[0] else ''}; rebuild the bundle")
    kv_dtype = manifest["graph"]["kv_cache"].get("dtype") if isinstance(manifest["graph"]["kv_cache"], dict) else None
    if kv_dtype not in KV_DTYPES:
        raise BundleError(f"{manifest_path}: KV cache type {kv_dtype}, which this edgellm cannot hold (it holds "
                          f"{', '.join(KV_DTYPES)}); rebuild the bundle")
    bundle = Bundle(path, manifest, raw)
    # Even unverified (checksums are then checked while the model loads), a missing file is named here, before
    # the model load or the tokenizer trips over it with a message that does not say which bundle file it was.
    for name in manifest["files"]:
        _check_present(inside_bundle(path, name, f"{manifest_path}: files entry {name!r}"))
    # Unlisted files too may be read (the tokenizer picks up chat_template.jinja and the like): none may be a link out.
    for entry in path.iterdir():
        if entry.is_symlink():
            inside_bundle(path, entry.name, f"{entry}: a symbolic link")
    _check_references(bundle)
    if verify:
        verify_bundle(bundle)
    else:
        check_graph_external_data(bundle, bundle.graph_path.read_bytes())
    return bundle


def inside_bundle(folder: Path, name: Any, entry: str) -> Path:
    """folder/name, refused (BundleError naming `entry`) unless it is a relative path that stays inside folder
    once `..` and symbolic links are resolved: a bundle reads no file but its own."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise BundleError(f"{entry}: not a file name")
    if os.path.isabs(name):
        raise BundleError(f"{entry}: an absolute path; a bundle may only name files inside its folder")
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(root, name))
    if real == root or os.path.commonpath([root, real]) != root:
        raise BundleError(f"{entry}: resolves to {real}, outside the bundle folder {root}")
    return Path(folder) / name


def _check_references(bundle: Bundle) -> None:
    """Each file the manifest's sections name is one of its checksummed `files` (hence inside the bundle)."""
    m = bundle.manifest
    refs = [("graph.file", m["graph"]["file"])]
    for section, keys in (("tokenizer", ("file", "config")), ("engine", ("file",))):
        value = m.get(section)
        if isinstance(value, dict):
            refs += [(f"{section}.{k}", value[k]) for k in keys if k in value]
    for key, name in refs:
        if not isinstance(name, str) or name not in m["files"]:
            raise BundleError(f"{bundle.path / MANIFEST_NAME}: {key} {name!r} is not one of the bundle's files; rebuild the bundle")


def check_graph_external_data(bundle: Bundle, graph: bytes) -> None:
    """Every tensor the graph (its bytes: `graph`) stores in another file names one of the bundle's own files.

    Checked before ONNX Runtime or TensorRT opens the graph, which resolve these locations themselves."""
    graph_path = bundle.graph_path
    try:
        locations = external_data_locations(graph)
    except MalformedGraph as e:
        raise BundleError(f"{graph_path}: not a readable ONNX graph ({e})") from None
    listed = {os.path.realpath(bundle.path / name) for name in bundle.manifest["files"]}
    first_user: dict[str, str] = {}  # hundreds of tensors share one data file: each location is checked once
    for tensor, location in locations:
        first_user.setdefault(location, tensor)
    for location, tensor in first_user.items():
        entry = f"{graph_path}: tensor {tensor!r} stores its data in {location!r}"
        # Relative to the graph's folder, as the runtimes read it; a listed file is inside the bundle.
        if os.path.realpath(inside_bundle(graph_path.parent, location, entry)) not in listed:
            raise BundleError(f"{entry}, which is not one of the bundle's files")


def _check_present(f: Path) -> None:
    if not f.is_file():
        raise BundleError(f"{f}: listed in the manifest but missing")


def verify_bundle(bundle: Bundle) -> None:
    """Check every file against the manifest's sha256; raise BundleError naming the first that differs.

    The graph is read once: the bytes whose external-data locations are checked are the bytes that were hashed."""
    graph_name, graph = bundle.manifest["graph"]["file"], None
    for name, digest in bundle.manifest["files"].items():
        f = inside_bundle(bundle.path, name, f"{bundle.path / MANIFEST_NAME}: files entry {name!r}")
        _check_present(f)
        if name == graph_name:
            graph = f.read_bytes()
            ok = hashlib.sha256(graph).hexdigest() == digest
        else:
            ok = file_sha256(f) == digest
        if not ok:
            raise BundleError(f"{f}: checksum mismatch (the file changed since the build); rebuild the bundle")
    check_graph_external_data(bundle, graph if graph is not None else bundle.graph_path.read_bytes())
