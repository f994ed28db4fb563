"""Seconds from `edgellm serve` to health SERVING, for a built bundle (the fast-start target: under 2 s).

    python bench/start_time.py [--bundle B] [--repeats 3]

Each run is a fresh process (imports, checksums, model load, warm-up), with the bundle's files in the page
cache (a first run after boot also pays the disk). Without --bundle it uses the demo model's bundle.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon_overhead import bundle_path  # bench/ is on sys.path: the script's own folder
from edgellm.client import NO_RETRIES, Client, EdgeLLMError


def time_to_serving(bundle: Path, timeout: float = 60.0) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "start.sock")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", "--bundle", str(bundle), "--unix", sock,
                                 "--log-level", "warning"], stdout=subprocess.DEVNULL)
        # Reconnect at once: gRPC's default backoff (1 s and up) would be measured instead of the daemon.
        client = Client(f"unix:{sock}", retry=NO_RETRIES, options=[("grpc.initial_reconnect_backoff_ms", 10),
                                                                   ("grpc.min_reconnect_backoff_ms", 10),
                                                                   ("grpc.max_reconnect_backoff_ms", 20)])
        try:
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {proc.returncode}")
                try:
                    if client.serving(timeout=0.5):
                        return time.perf_counter() - t0
                except EdgeLLMError:
                    time.sleep(0.01)  # not listening yet
            raise TimeoutError(f"not SERVING after {timeout} s")
        finally:
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = bundle_path(args.bundle)
    times = [time_to_serving(path) for _ in range(args.repeats + 1)][1:]  # the first run fills the page cache
    print(f"{path.name}: start to SERVING {statistics.median(times):.2f} s (median of {args.repeats}; "
          f"{', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
