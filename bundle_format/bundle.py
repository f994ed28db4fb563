"""The engine bundle: a folder with `manifest.yaml`, the graph (or engine), its weights and the tokenizer.

This module owns the on-disk format: the build step writes it (build_engine/bundle_writer.py) and the
daemon loads it with load_bundle, which refuses any bundle whose files do not match the checksums in its manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bundle_format.kv_cache import KvCacheLayout

MANIFEST_NAME = "manifest.yaml"
FORMAT_VERSION = 2  # 2: CPU bundles carry the GroupQueryAttention graph (build_engine/cpu_graph.py)
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
    """Read a bundle's manifest and (by default) check every file against its sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing (is {path} an edgellm bundle?)")
    try:
        # The C loader when PyYAML has it: parsing the manifest counts at daemon start (docs/bundles.md).
        manifest = yaml.load(manifest_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
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
    bundle = Bundle(path, manifest)
    # Even unverified (checksums are then checked while the model loads), a missing file is named here, before
    # the model load or the tokenizer trips over it with a message that does not say which bundle file it was.
    for name in manifest["files"]:
        _check_present(path / name)
    if verify:
        verify_bundle(bundle)
    return bundle


def _check_present(f: Path) -> None:
    if not f.is_file():
        raise BundleError(f"{f}: listed in the manifest but missing")


def verify_bundle(bundle: Bundle) -> None:
    """Check every file against the manifest's sha256; raise BundleError naming the first that differs."""
    for name, digest in bundle.manifest["files"].items():
        f = bundle.path / name
        _check_present(f)
        if file_sha256(f) != digest:
            raise BundleError(f"{f}: checksum mismatch (the file changed since the build); rebuild the bundle")

