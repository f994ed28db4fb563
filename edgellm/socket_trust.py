"""Whether a Unix socket (and the folder it sits in) can be trusted: shared by the daemon and its clients.

A socket in a folder that another user owns, or that group or others may write, can be unlinked and
replaced by an impostor; ssh-agent and tmux refuse such folders for the same reason. Only the folder
the socket sits in is judged: a folder above it can be a shared one such as /tmp, whose sticky bit keeps
other users from renaming or removing a folder they do not own.
"""

from __future__ import annotations

import os
import stat


class UntrustedSocket(Exception):
    """A socket or its folder could be replaced by another user; the message says why and what to do."""


class SocketMissing(UntrustedSocket):
    """No socket (or no folder) at the path: nobody serves there yet, which is not a sign of an impostor."""


def default_unix_socket() -> str:
    """$XDG_RUNTIME_DIR/edgellm.sock, else a per-user folder under /tmp: shared by `serve` and the clients."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "edgellm.sock")
    return f"/tmp/edgellm-{os.getuid()}/edgellm.sock"


def socket_folder(path: str) -> str:
    """The folder a socket path sits in."""
    return os.path.dirname(os.path.abspath(path)) or "/"


def check_private_folder(folder: str, uid: int | None = None) -> None:
    """Raise UntrustedSocket unless `folder` is a real folder owned by `uid` (default: ours), not writable by group or others.

    Group or others may read and search it (0750, 0755): only a write lets them replace what is inside."""
    uid = os.getuid() if uid is None else uid
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise SocketMissing(f"socket folder {folder} does not exist (is `edgellm serve` running?)") from None
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedSocket(f"socket folder {folder} is a symbolic link (to {os.readlink(folder)}): whoever can change "
                              f"the link can move the socket; use a real folder owned by uid {uid}")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedSocket(f"socket folder {folder} is not a folder")
    if st.st_uid != uid:
        raise UntrustedSocket(
            f"socket folder {folder} is owned by uid {st.st_uid}, not {uid}: that user could replace the socket; "
            f"have it removed (by its owner or root), or use a socket in a folder you own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedSocket(
            f"socket folder {folder} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"another user could replace the socket; run `chmod go-w {folder}`, or use a socket in another folder")


def make_private_folder(folder: str, uid: int | None = None) -> bool:
    """Create `folder` with mode 0700 (its parents as needed), or check the one already there (check_private_folder).

    True when this call created it. mkdir fails on an existing name, so a folder (or link) another user put
    there first is never taken for ours: it is checked like any folder we did not create."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        check_private_folder(folder, uid)
        return False
    os.chmod(folder, 0o700)  # mkdir's mode passes through the umask; 0700 whatever the umask
    return True


def check_socket_owner(path: str, uid: int | None = None) -> None:
    """Raise UntrustedSocket unless `path` is a socket owned by `uid` (default: ours) in a private folder.

    SocketMissing when the folder or the socket is not there (nothing listens yet)."""
    uid = os.getuid() if uid is None else uid
    check_private_folder(socket_folder(path), uid)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SocketMissing(f"no socket at {path} (is `edgellm serve` running?)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UntrustedSocket(f"{path} is not a socket")
    if st.st_uid != uid:
        raise UntrustedSocket(f"socket {path} is owned by uid {st.st_uid}, not {uid}: refusing to send to it")
