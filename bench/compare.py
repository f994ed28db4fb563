"""edgellm beside llama.cpp and ONNX Runtime GenAI on the same model, the same bit width and the same workload.

    bash bench/setup_comparisons.sh                      # once: .venv-bench with llama.cpp and ORT GenAI
    .venv/bin/python bench/compare.py                    # the demo model (SmolLM2-135M), int8 and int4
    .venv-bench/bin/python bench/make_random_llama.py       # once: the ~360M random-weight Llama
    .venv-bench/bin/python bench/make_random_llama.py --size 1.1b   # once: TinyLlama-1.1B's shape
    .venv/bin/python bench/compare.py --model .cache/bench/llama-360m --no-accuracy-gate

Per precision, in --rounds rounds, each runtime right after the other within a round (every other
round in reverse order; 2 threads each, batch 1, greedy, end-of-sequence ignored, random prompt token
ids from the same seed): decode tokens/s over --new-tokens after a --decode-prompt-tokens prompt, and
prefill tokens/s of a --prefill-tokens prompt, for
  edgellm daemon   `edgellm serve` on the bundle, driven over its Unix socket (what a client sees): with the
                   server's default stream interval ("auto": 25 ms chunks where the model fills every core),
                   with every token streamed at once ("daemon per token"), the same without speculative
                   decoding ("daemon, no speculation": the like-for-like row, as the other runtimes do not
                   speculate and what speculation gains depends on the text), and with --stream-interval-ms,
                   with requests asking for that interval
  edgellm direct   ONNX Runtime driven directly on the same bundle (bench/daemon_overhead.py's loop, on one
                   session kept for the whole run, as the daemon keeps its own)
  llama.cpp        llama-cpp-python built from source: the same weights as GGUF (int8 = Q8_0, int4 = Q4_0)
  ORT GenAI        its model builder's graph of the same checkpoint (its int8/int4 MatMulNBits in edgellm's blocks,
                   accuracy level 4)
and the ratios of each edgellm daemon row to each other runtime (the median of each round's ratio, with its spread over
the rounds: quartiles from 4 rounds on, else min-max). Beside each runtime: the bytes of weights a decode token reads
(from its own file: edgellm's manifest, the GGUF's tensors, ORT GenAI's graph) and the share of this machine's memory
bandwidth roofline its decode reached (weights plus the KV cache read per token, against a numpy read-bandwidth test
run once per round, so that it drifts with the runtimes). The CPU's SIMD flags are printed and recorded. Everything it
builds goes to .cache/bench/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from daemon_overhead import DirectLoop, alternating_rounds, daemon_rows, default_interval_line, random_prompt, serving, through_daemon  # noqa: E402

from bundle_format.bundle import load_bundle  # noqa: E402
from daemon.huge_pages import reexec_with_huge_pages  # noqa: E402
from edgellm.bench import measure_read_bandwidth  # noqa: E402

BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
CACHE = ROOT / ".cache" / "bench"
PREFILL_NEW = {"llama.cpp": 1, "genai": 2}  # tokens asked for when timing a prefill (GenAI needs one to decode)
GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}  # llama.cpp's file type at each bit width


# The /proc/cpuinfo flags that decide which kernels llama.cpp and ONNX Runtime pick (prefixes).
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512", "avx_vnni", "amx", "asimd", "sve", "i8mm", "dotprod")
GATHER_OPS = {"Gather", "GatherBlockQuantized"}  # read a row per token, not the whole table


def cpu_flags() -> list[str]:
    """The SIMD flags of this CPU that matter for these kernels (x86: avx2, avx512*, vnni, amx; arm: asimd, sve...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(f for f in line.split(":", 1)[1].split() if f.startswith(SIMD_FLAGS))
    return sorted(flags)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """Median with its spread over rounds: quartiles from 4 values on, else min-max."""
    med = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        return f"{fmt.format(med)} (IQR {fmt.format(q1)}-{fmt.format(q3)})"
    return f"{fmt.format(med)} (range {fmt.format(min(values))}-{fmt.format(max(values))})"


def gguf_bytes_per_token(path: Path) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes per position at f16, llama.cpp's default) a decode token of a GGUF reads: every
    tensor but the token embedding, which is only gathered unless it doubles as the output matrix (tied)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    total = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight" or tied)
    fields = {f.name: f for f in reader.fields.values()}
    arch = bytes(fields["general.architecture"].parts[-1]).decode()

    def value(key: str) -> int:
        f = fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])
    layers, heads, dim = value("block_count"), value("attention.head_count"), value("embedding_length")
    kv_heads = value("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in fields else heads
    return total, 2 * layers * kv_heads * (dim // heads) * 2


def onnx_bytes_per_token(path: Path) -> int:
    """Bytes of initializers an ONNX graph's decode step reads whole (all but tables that are only gathered)."""
    import math

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer if not readers.get(t.name, GATHER_OPS) <= GATHER_OPS)


def run(cmd: list[str], **kw) -> str:
    print("  $", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def edgellm_bundle(model: Path, name: str, precision: str, accuracy_gate: bool) -> Path:
    from build_engine.weight_quant import BITS, BLOCK_SIZES

    # The block size in the name: a bundle cached from an older int4 layout is not silently reused.
    out = CACHE / "bundles" / (f"{name}-{precision}-b{BLOCK_SIZES[BITS[precision]]}" if precision in BITS
                               else f"{name}-{precision}")
    if (out / "manifest.yaml").exists():
        return out
    if accuracy_gate:
        run([sys.executable, "-m", "edgellm", "build", str(model), "-o", str(out), "--precision", precision, "--force"])
    else:  # random weights: the accuracy is still measured and recorded, but not enforced
        from build_engine import accuracy
        from build_engine.build import build_bundle

        accuracy.THRESHOLDS[precision] = (float("inf"), 0.0)
        build_bundle(model, out, precision=precision, force=True)
    return out


def hf_folder(model: Path, name: str) -> Path:
    """A Hugging Face folder for ORT GenAI's builder and llama.cpp's converter (a GGUF source is dequantized)."""
    if model.is_dir():
        return model
    out = CACHE / f"{name}-hf"
    if (out / "config.json").exists():
        return out
    from safetensors.numpy import save_file

    from build_engine.gguf_checkpoint import load_gguf

    ck = load_gguf(model)
    s = ck.spec
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [s.hf_architecture], "model_type": s.architecture, "vocab_size": s.vocab_size,
              "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
              "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
              "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim, "rms_norm_eps": s.rms_norm_eps,
              "rope_theta": s.rope_theta, "max_position_embeddings": s.max_position_embeddings,
              "tie_word_embeddings": s.tie_word_embeddings, "bos_token_id": s.bos_token_id,
              "eos_token_id": list(s.eos_token_ids)[0] if s.eos_token_ids else None, "hidden_act": "silu",
              "torch_dtype": "float32", "attention_bias": s.attention_bias}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in ck.weights.items()}, str(out / "model.safetensors"))
    (out / "tokenizer.json").write_text(ck.tokenizer_json)
    (out / "tokenizer_config.json").write_text(json.dumps(ck.tokenizer_config, indent=1))
    return out


def gguf_file(model: Path, name: str, precision: str) -> Path:
    out = CACHE / f"{name}-{GGUF_TYPES[precision]}.gguf"
    if out.exists():
        return out
    source = model
    if model.is_dir():  # llama.cpp's own converter, to f32; then its quantizer
        source = CACHE / f"{name}-F32.gguf"
        if not source.exists():
            run([str(BENCH_PY), str(ROOT / ".venv-bench" / "llama.cpp" / "convert_hf_to_gguf.py"), str(model),
                 "--outtype", "f32", "--outfile", str(source)])
        if precision == "fp32":
            return source
    code = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{GGUF_TYPES[precision]}; p.allow_requantize = True; "
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    run([str(BENCH_PY), "-c", code, str(source), str(out)])
    return out


def genai_folder(hf: Path, name: str, precision: str) -> Path:
    from build_engine.weight_quant import BITS, BLOCK_SIZES

    block = BLOCK_SIZES[BITS[precision]] if precision in BITS else None
    out = CACHE / f"{name}-genai-{precision}" if block is None else CACHE / f"{name}-genai-{precision}-b{block}"
    if not (out / "genai_config.json").exists():
        # The same quantization as edgellm's: symmetric, the same blocks, int8 activations in the kernel.
        opts = ["--extra_options", f"block_size={block}", "accuracy_level=4"] if block else []
        run([str(BENCH_PY), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p",
             precision, "-e", "cpu",
             "-c", str(CACHE / "genai-cache"), *opts])
    return out


def worker(runtime: str, model: Path, prompt: int, new: int) -> dict[str, float]:
    out = run([str(BENCH_PY), str(ROOT / "bench" / "comparison_workers.py"), runtime, str(model), "--prompt-tokens",
               str(prompt), "--new-tokens", str(new), "--repeats", "1"])
    return json.loads(out.strip().splitlines()[-1])


def measure(model: Path, name: str, precision: str, others: list[str], args) -> dict[str, dict[str, float]]:
    """Rounds in which every runtime runs the decode and the prefill workload once, one right after the
    other (every other round in reverse order): figures are medians over rounds, and each ratio is the
    median of the ratios within a round (on a shared machine whose speed drifts over minutes, only runs
    seconds apart compare fairly)."""
    bundle_path = edgellm_bundle(model, name, precision, not args.no_accuracy_gate)
    bundle = load_bundle(bundle_path, verify=False)
    decode_prompt, prefill_prompt = random_prompt(bundle, args.decode_prompt_tokens), random_prompt(bundle, args.prefill_tokens)
    files = {}
    if "llama.cpp" in others:
        files["llama.cpp"] = gguf_file(model, name, precision)
    if "genai" in others:
        try:
            files["genai"] = genai_folder(hf_folder(model, name), name, precision)
        except subprocess.CalledProcessError as e:
            print(f"  ORT GenAI's builder failed at {precision}: {e}", flush=True)
    m = bundle.manifest
    kv = m["graph"]["kv_cache"]
    edgellm_kv = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4  # fp32 cache, bytes per position
    weights = {"edgellm": (m["graph"]["weight_bytes_per_token"], edgellm_kv)}
    if "llama.cpp" in files:
        weights["llama.cpp"] = gguf_bytes_per_token(files["llama.cpp"])
    if "genai" in files:
        weights["genai"] = (onnx_bytes_per_token(files["genai"] / "model.onnx"), edgellm_kv)  # its cache is fp32 too
    daemons = daemon_rows(args.stream_interval_ms)
    loop = DirectLoop(bundle)
    with serving(bundle_path) as address:
        print(f"  {default_interval_line(address)}", flush=True)

        def run_once(runtime: str) -> dict[str, float]:
            """One decode and one prefill run of `runtime`: tokens/s of each (or this machine's read bandwidth)."""
            if runtime == "bandwidth":
                return {"bytes_per_s": measure_read_bandwidth(1 << 28)}
            if runtime in daemons:
                options = daemons[runtime]
                decode = through_daemon(address, decode_prompt, args.new_tokens, **options)[1]
                ttft = through_daemon(address, prefill_prompt, 2, **options)[0]
                return {"decode_tokens_per_s": decode, "prefill_tokens_per_s": args.prefill_tokens / ttft}
            if runtime == "direct":
                return {"decode_tokens_per_s": loop.run(decode_prompt, args.new_tokens)[1],
                        "prefill_tokens_per_s": args.prefill_tokens / loop.run(prefill_prompt, 2)[0]}
            f = files[runtime]
            return {"decode_tokens_per_s": worker(runtime, f, args.decode_prompt_tokens, args.new_tokens)["decode_tokens_per_s"],
                    "prefill_tokens_per_s": worker(runtime, f, args.prefill_tokens, PREFILL_NEW[runtime])["prefill_tokens_per_s"]}

        runs = alternating_rounds(["bandwidth", *daemons, "direct", *files], args.rounds, run_once)
    bandwidth = [r["bytes_per_s"] for r in runs.pop("bandwidth")]
    mean_position = args.decode_prompt_tokens + args.new_tokens / 2
    keys = ("decode_tokens_per_s", "prefill_tokens_per_s")
    table: dict[str, dict] = {"_machine": {"read_bandwidth_gb_s": [b / 1e9 for b in bandwidth]}}
    for rt, rs in runs.items():
        w, kv_per_position = weights["edgellm" if rt in daemons or rt == "direct" else rt]
        step = w + kv_per_position * mean_position
        table[rt] = {k: [r[k] for r in rs] for k in keys}
        table[rt]["weight_bytes_per_token"] = w
        # Share of the roofline, round by round: bytes this decode streamed per second / that round's bandwidth.
        table[rt]["roofline_share"] = [r["decode_tokens_per_s"] * step / b for r, b in zip(rs, bandwidth)]
    for rt in runs:
        if rt in daemons:
            continue
        for row in daemons:
            for k in keys:
                table[rt][f"{row}/{k.split('_')[0]}"] = [d[k] / o[k] for d, o in zip(runs[row], runs[rt])]
    return table


def main() -> None:
    # Huge pages as the daemon runs with them, for every runtime of the run alike (children inherit them).
    reexec_with_huge_pages([os.path.abspath(__file__), *sys.argv[1:]])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint folder or GGUF file (default: the demo model's GGUF)")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--runtimes", default="llama.cpp,genai", help="others beside edgellm")
    ap.add_argument("--decode-prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9,
                    help="alternating rounds (9: enough for quartiles that state the spread honestly on a shared "
                         "machine; 3 gave ratios whose spread was wider than the effects)")
    ap.add_argument("--stream-interval-ms", type=int, default=0,
                    help="also measure the daemon with its requests asking for tokens batched this far apart "
                         "(GenerateRequest.stream_interval_ms)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--no-accuracy-gate", action="store_true",
                    help="build edgellm bundles whatever their accuracy (random-weight models, e.g. llama-360m)")
    args = ap.parse_args()
    if args.model:
        model = Path(args.model).resolve()
    else:
        from build_engine.demo_model import demo_gguf_path
        from edgellm.cli import cache_dir

        model = demo_gguf_path(cache_dir())
    name = model.stem if model.is_file() else model.name
    others = [r for r in args.runtimes.split(",") if r]
    if others and not BENCH_PY.exists():
        sys.exit("no .venv-bench: run bash bench/setup_comparisons.sh first (or --runtimes '')")
    CACHE.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for precision in args.precisions.split(","):
        print(f"== {name} {precision}", flush=True)
        table[precision] = measure(model, name, precision, others, args)
    flags = cpu_flags()
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores ({_cpu_name()}); "
          f"CPU flags: {' '.join(flags) or '?'}")
    print(f"model {name}; decode: prompt {args.decode_prompt_tokens}, {args.new_tokens} new tokens; prefill: "
          f"{args.prefill_tokens} tokens; batch 1; medians of {args.rounds} alternating rounds, spread in brackets "
          f"({'interquartile' if args.rounds >= 4 else 'min-max'}); ratios are per round, then summarized")
    for precision, rows in table.items():
        bw = rows["_machine"]["read_bandwidth_gb_s"]
        print(f"{precision}: read bandwidth {spread(bw, '{:.1f}')} GB/s")
        for runtime, r in rows.items():
            if runtime == "_machine":
                continue
            print(f"  {runtime:22s} decode {spread(r['decode_tokens_per_s'], '{:.1f}')} tok/s   prefill "
                  f"{spread(r['prefill_tokens_per_s'], '{:.0f}')} tok/s   "
                  f"{r['weight_bytes_per_token'] / 1e6:.1f} MB/token"
                  f"   roofline {spread([100 * x for x in r['roofline_share']], '{:.0f}')}%")
            for key in r:
                if key.endswith("/decode"):
                    print(f"      {key.split('/')[0]} / {runtime}: decode {spread(r[key])}x, prefill "
                          f"{spread(r[key.replace('decode', 'prefill')])}x")
    if args.json:
        record = {"model": name, "cpu": _cpu_name(), "cpu_flags": flags, "cores": os.cpu_count(),
                  "rounds": args.rounds, "table": table}
        Path(args.json).write_text(json.dumps(record, indent=1))


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
