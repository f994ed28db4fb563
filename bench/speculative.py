"""Speculative decoding through the daemon: decode tokens/s with and without it, on an input-grounded task and on
open-ended generation, with the acceptance rate and the tokens each verify pass gave.

    python bench/speculative.py [--bundle B] [--draft D] [--rounds 5] [--new-tokens 128] [--threads 0]

One `edgellm serve` (one slot, prefix cache off, speculative.enabled: true; with --draft, that bundle drafts) serves
both rows of each task, in alternating order, round by round: "spec" leaves GenerateRequest.speculative unset,
"plain" sets it false. Tasks (chat prompts, greedy, --new-tokens new tokens, end-of-sequence ignored):
  grounded    extract the steps of a ~500-token manual excerpt (the answer quotes its input)
  open-ended  a story from a one-line prompt (no overlap with the prompt)
Decode tokens/s: (completion tokens - 1) / (time from the first token to the end), as the client sees it. The
acceptance figures come from the daemon's /metrics counters (edgellm_speculative_*), read around each request.
Also checks that the spec and plain outputs are the same token for token. Without --bundle: the demo model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc

from daemon_overhead import alternating_rounds, bundle_path, spread  # bench/ is on sys.path
from edgellm.v1 import edgellm_pb2 as pb
from edgellm.v1 import edgellm_pb2_grpc as pb_grpc

MANUAL = """\
VOLTA CITY E-200 ELECTRIC SCOOTER - OWNER'S MANUAL, SECTION 7: BATTERY AND CHARGING

7.1 About the battery. Your scooter is powered by a 48 V, 15 Ah lithium-ion battery pack mounted under the \
footboard. The pack contains a battery management system that protects the cells against overcharging, deep \
discharge, short circuits and excessive temperature. A fully charged pack gives a range of up to 45 km on flat \
roads at 20 km/h with a rider of 75 kg. Range is reduced by cold weather, headwinds, hills, low tyre pressure \
and frequent acceleration.

7.2 Charging procedure. Charge the battery only with the supplied charger (model VC-CH54, output 54.6 V, 3 A).
Step 1: Switch the scooter off and wait until the display is dark.
Step 2: Open the rubber cover of the charging port on the left side of the deck.
Step 3: Connect the charger to the scooter first, then plug the charger into a grounded wall socket.
Step 4: Check that the charger lamp turns red. Red means charging; green means the pack is full.
Step 5: When the lamp turns green, unplug the charger from the wall socket first, then from the scooter.
Step 6: Close the rubber cover firmly so that no water or dust can enter the port.
A full charge from empty takes about six hours. Charging is only allowed at ambient temperatures between \
0 degrees C and 40 degrees C. If the pack is warm after a ride, let it cool for 30 minutes before charging.

7.3 Storage. If you do not ride the scooter for more than 30 days, charge the pack to between 50 and 70 percent \
and store the scooter indoors in a dry place between 10 degrees C and 25 degrees C. Recharge it to that level \
every two months. A pack that is stored empty for a long time can be damaged beyond repair; such damage is not \
covered by the warranty.

7.4 Warnings. Never open the battery pack or the charger. Never charge the scooter near flammable materials or \
while you sleep. Never use a charger that is damaged, wet or made for another model. Stop charging at once if \
the pack becomes hot, swells, smokes or smells of burning, move the scooter outdoors if it is safe to do so, \
and call the fire brigade. Do not ride through water deeper than 3 cm, and never clean the scooter with a \
pressure washer.
"""

TASKS = {
    "grounded": [pb.ChatMessage(role="user", content=MANUAL + "\nCopy the six steps of the charging procedure "
                                "(section 7.2) exactly as they are written in the manual, one per line.")],
    "open-ended": [pb.ChatMessage(role="user", content="Write a short story about a lighthouse keeper who finds "
                                  "a strange bird on the rocks one winter morning.")],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(path: Path, threads: int, draft: str | None, max_draft_tokens: int) -> Iterator[tuple[str, str]]:
    """`edgellm serve` with speculation on; yields (its gRPC address, its metrics URL) once ready and warmed up."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "bench.sock")
        config = os.path.join(tmp, "config.yaml")
        metrics = f"127.0.0.1:{free_port()}"
        Path(config).write_text(
            f"engine:\n  threads: {threads}\nprefix_cache:\n  enabled: false\nservice:\n  metrics: \"{metrics}\"\n"
            f"speculative:\n  enabled: true\n  max_draft_tokens: {max_draft_tokens}\n")
        cmd = [sys.executable, "-m", "edgellm", "serve", "--bundle", str(path), "--config", config, "--unix", sock,
               "--slots", "1", "--log-level", "warning", *(["--draft", draft] if draft else [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:
                if "ready on" in line:
                    break
            else:
                raise SystemExit(f"edgellm serve exited with {proc.wait()}")
            address = f"unix:{sock}"
            ask(address, TASKS["open-ended"], 8, True)  # warm-up: the one-row decode time gets measured too
            yield address, f"http://{metrics}/metrics"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def ask(address: str, messages, new_tokens: int, speculative: bool) -> tuple[list[int], float]:
    """One greedy request: (its token ids, decode tokens/s)."""
    req = pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), max_new_tokens=new_tokens, ignore_eos=True,
                             sampling=pb.SamplingParams(temperature=0))
    if not speculative:
        req.speculative = False
    ids, first = [], None
    with grpc.insecure_channel(address) as channel:
        for msg in pb_grpc.InferenceStub(channel).Generate(req, timeout=600):
            if msg.HasField("tokens") and msg.tokens.token_ids:
                if first is None:
                    first = time.perf_counter()
                ids += msg.tokens.token_ids
    return ids, (len(ids) - 1) / (time.perf_counter() - first)


def counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^edgellm_speculative_(\w+)_total (\S+)$", text, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle")
    ap.add_argument("--draft", help="a draft model's bundle (same tokenizer); default: prompt lookup")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-draft-tokens", type=int, default=8)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    args = ap.parse_args()
    path = bundle_path(args.bundle)
    report = []
    with serving(path, args.threads, args.draft, args.max_draft_tokens) as (address, metrics):
        for task in args.tasks.split(","):
            messages = TASKS[task]
            stats = {"passes": 0.0, "drafted_tokens": 0.0, "accepted_tokens": 0.0}
            outputs: dict[str, list[int]] = {}

            def once(row: str) -> float:
                before = counters(metrics)
                ids, rate = ask(address, messages, args.new_tokens, row == "spec")
                after = counters(metrics)
                if row == "spec":
                    for k in stats:
                        stats[k] += after.get(k, 0.0) - before.get(k, 0.0)
                first = outputs.setdefault(row, ids)
                if first != ids:
                    at = next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), min(len(first), len(ids)))
                    print(f"  note: {task} {row}: greedy output differs from the first round's at token {at}",
                          file=sys.stderr)
                return rate

            results = alternating_rounds(["spec", "plain"], args.rounds, once)
            ratios = [s / p for s, p in zip(results["spec"], results["plain"])]
            passes = max(stats["passes"], 1.0)
            report.append(
                f"  {task:10s} plain {statistics.median(results['plain']):6.1f} tok/s, spec "
                f"{statistics.median(results['spec']):6.1f} tok/s; spec/plain {spread(ratios)}; "
                f"acceptance {stats['accepted_tokens'] / max(stats['drafted_tokens'], 1):.2f}, "
                f"{(stats['accepted_tokens'] + stats['passes']) / passes:.2f} tokens per verify pass, "
                f"{stats['passes'] / args.rounds:.0f} passes per request; "
                f"same output: {outputs['spec'] == outputs['plain']}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; bundle {path.name}"
          f"{'; draft ' + Path(args.draft).name if args.draft else '; prompt lookup'}; greedy, {args.new_tokens} "
          f"new tokens, max_draft_tokens {args.max_draft_tokens}; {args.rounds} alternating rounds")
    print("\n".join(report))


if __name__ == "__main__":
    main()
