"""Transparent huge pages for the model's weights: the daemon re-executes itself once with glibc asking for them.

Decode streams every weight once per token. With 4 KiB pages that is ~40 000 TLB misses per token for a
150 MB model, each a page walk (two-level in a VM); with 2 MiB pages, ~75. Where the kernel's THP mode is
`madvise` (Debian's default), memory gets huge pages only when asked with madvise(MADV_HUGEPAGE), which
ONNX Runtime does not do for its weight buffers, but glibc's malloc does for all its large blocks when
started with the tunable `glibc.malloc.hugetlb=1`. Measured on the int8 demo model, 2-core VM:
1.05-1.15x the decode tokens/s. (numpy already asks for huge pages for the KV cache arrays.)
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def reexec_with_huge_pages(argv: list[str]) -> None:
    """Replace this process by `python argv...` with the tunable set, unless GLIBC_TUNABLES already says
    something of glibc.malloc.hugetlb (set it to 0 to opt out). The PID, open file descriptors (systemd's
    sockets) and the environment (NOTIFY_SOCKET) are kept."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, TUNABLE])))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
