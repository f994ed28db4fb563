"""Write an engine bundle atomically: everything goes into a temporary sibling folder, then one rename."""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import logging
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import onnx
import yaml

from bundle_format.bundle import FORMAT_VERSION, MANIFEST_NAME, file_sha256
from bundle_format.signature import SIGNATURE_NAME
from edgellm import __version__

log = logging.getLogger("edgellm.build")

_ONNX_TYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64",
                    onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool"}


def weight_bytes_per_token(model: onnx.ModelProto) -> int:
    """Bytes of initializers a decode step reads whole: all but tables that only a Gather reads (a row per token).

    With the KV cache in use, this is what bounds decode speed on a CPU (memory bandwidth / bytes per token)."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = 0
    for t in model.graph.initializer:
        if readers.get(t.name, {"Gather"}) == {"Gather"}:
            continue
        total += math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def describe_io(values: Any) -> list[dict[str, Any]]:
    """Name, dtype and shape (numbers or symbolic names) of graph inputs or outputs."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _ONNX_TYPE_NAMES.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return out


def runtime_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def _bundle_id(files: dict[str, str]) -> str:
    """The bundle's id: a hash of its file names and checksums, so any changed file gives a new id."""
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in sorted(files.items())).encode()).hexdigest()[:16]


def write_bundle(out: Path, write_payload: Callable[[Path], None], manifest: dict[str, Any], force: bool = False,
                 sign: Callable[[Path], Any] | None = None) -> Path:
    """Create bundle `out`: write_payload fills a temp folder, then checksums and the manifest are added.

    `manifest` gets format_version, bundle_id, files, versions and a timestamp added here. `sign(folder)` signs
    the finished folder before it is renamed into place, so a signed bundle never appears unsigned.
    """
    out = Path(out).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # this folder is being written: remove_leftovers of another build keeps it
    try:
        write_payload(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        full = {"format_version": FORMAT_VERSION, "bundle_id": _bundle_id(files),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "edgellm_version": __version__, "runtimes": runtime_versions(), **manifest, "files": files}
        (tmp / MANIFEST_NAME).write_text(yaml.safe_dump(full, sort_keys=False))
        if sign:
            sign(tmp)
        _sync_folder(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _fsync(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _NO_ROOM:
            raise BundleWriteError(f"cannot write the bundle {out}: {e.strerror}; nothing of it was kept "
                                   f"(free space on {out.parent}'s file system, or raise the file size limit, "
                                   f"and build again)") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return out


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the temporary folders of builds of `out` that were killed mid-write: a build holds a lock on its
    folder while it writes (released by the kernel however the build ends), so an unlocked one is left over."""
    removed = []
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a build is writing it now
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


class BundleWriteError(OSError):
    """The bundle could not be written for lack of room (disk, quota or file size limit); none of it was kept."""


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Flush the folder's files and its entries to disk before it is renamed into place: after a power cut the
    bundle is then whole or absent, and a write that only fails at writeback (a full disk) fails the build here."""
    for f in folder.iterdir():
        _fsync(f)
    _fsync(folder)


def update_bundle(path: Path, new_files: dict[str, bytes], manifest_changes: dict[str, Any]) -> None:
    """Add (or replace) files in an existing bundle and update its manifest: checksums, bundle id, changes.

    Each file is written beside its final name and renamed into place, the manifest last, so a crash
    leaves either the old manifest (which does not list the new file) or the complete new one."""
    path = Path(path)
    manifest = yaml.safe_load((path / MANIFEST_NAME).read_text())
    for name, data in new_files.items():
        manifest["files"][name] = hashlib.sha256(data).hexdigest()  # the bytes are here: no need to read them back
        tmp = path / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        tmp.rename(path / name)
    files = dict(sorted(manifest.pop("files").items()))
    manifest.update(manifest_changes)
    manifest["bundle_id"] = _bundle_id(files)
    manifest["files"] = files
    tmp = path / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    signature = path / SIGNATURE_NAME
    if signature.exists():  # it covers the old manifest only: a daemon that requires signatures would refuse it
        signature.unlink()
        log.warning("%s: removed %s, which signed the manifest before this change; sign the bundle again "
                    "(edgellm sign %s --key KEY)", path, SIGNATURE_NAME, path)
    tmp.rename(path / MANIFEST_NAME)
