"""Whether a Unix socket (and the folder it sits in) can be trusted: shared by the daemon and its clients.

A socket in a folder that another user owns, or that group or others may write, can be unlinked and
replaced by an impostor; ssh-agent and tmux refuse such folders for the same reason.
"""

from __future__ import annotations

import os
import stat


class UntrustedSocket(Exception):
    """A socket or its folder could be replaced by another user; the message says why and what to do."""


def default_unix_socket() -> str:
    """$XDG_RUNTIME_DIR/edgellm.sock, else a per-user folder under /tmp: shared by `serve` and the clients."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "edgellm.sock")
    return f"/tmp/edgellm-{os.getuid()}/edgellm.sock"


def check_private_folder(folder: str, uid: int | None = None) -> None:
    """Raise UntrustedSocket unless `folder` is a real folder owned by `uid` (default: ours), not writable by group or others."""
    uid = os.getuid() if uid is None else uid
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise UntrustedSocket(f"socket folder {folder} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedSocket(f"socket folder {folder} is a symbolic link; use a real folder owned by uid {uid}")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedSocket(f"socket folder {folder} is not a folder")
    if st.st_uid != uid:
        raise UntrustedSocket(
            f"socket folder {folder} is owned by uid {st.st_uid}, not {uid}: another user could replace the socket; "
            f"remove the folder or set listen.unix to a path in a folder you own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedSocket(
            f"socket folder {folder} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"another user could replace the socket; run `chmod go-w {folder}` or use another folder")


def check_socket_owner(path: str, uid: int | None = None) -> None:
    """Raise UntrustedSocket unless `path` is a socket owned by `uid` (default: ours) in a private folder."""
    uid = os.getuid() if uid is None else uid
    check_private_folder(os.path.dirname(os.path.abspath(path)) or "/", uid)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UntrustedSocket(f"no daemon socket at {path}: is `edgellm serve` running?") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UntrustedSocket(f"{path} is not a socket")
    if st.st_uid != uid:
        raise UntrustedSocket(f"socket {path} is owned by uid {st.st_uid}, not {uid}: refusing to send to it")
