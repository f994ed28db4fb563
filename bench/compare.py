"""edgellm beside llama.cpp and ONNX Runtime GenAI on the same model, the same bit width and the same workload.

    bash bench/setup_comparisons.sh                      # once: .venv-bench with llama.cpp and ORT GenAI
    .venv/bin/python bench/compare.py                    # the demo model (SmolLM2-135M), int8 and int4
    .venv-bench/bin/python bench/make_llama360m.py       # once: the ~360M random-weight Llama
    .venv/bin/python bench/compare.py --model .cache/bench/llama-360m --no-accuracy-gate

Per precision, in one run, one runtime after the other (2 threads each, batch 1, greedy, end-of-sequence
ignored, random prompt token ids from the same seed): decode tokens/s over --new-tokens after a
--decode-prompt-tokens prompt, and prefill tokens/s of a --prefill-tokens prompt, for
  edgellm daemon   `edgellm serve` on the bundle, driven over its Unix socket (what a client sees)
  edgellm direct   ONNX Runtime driven directly on the same bundle (bench/daemon_overhead.py's loop)
  llama.cpp        llama-cpp-python built from source: the same weights as GGUF (int8 = Q8_0, int4 = Q4_0)
  ORT GenAI        its model builder's graph of the same checkpoint (its int8/int4 MatMulNBits, block 32, accuracy level 4)
and the ratios edgellm daemon / each other runtime. Everything it builds goes to .cache/bench/ (gitignored).
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

from daemon_overhead import direct, random_prompt, serving, through_daemon  # noqa: E402

from daemon.bundle import load_bundle  # noqa: E402

BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
CACHE = ROOT / ".cache" / "bench"
GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}  # llama.cpp's file type at each bit width


def run(cmd: list[str], **kw) -> str:
    print("  $", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def edgellm_bundle(model: Path, name: str, precision: str, accuracy_gate: bool) -> Path:
    out = CACHE / "bundles" / f"{name}-{precision}"
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
    out = CACHE / f"{name}-genai-{precision}"
    if not (out / "genai_config.json").exists():
        # The same quantization as edgellm's: symmetric blocks of 32, int8 activations in the kernel.
        opts = ["--extra_options", "block_size=32", "accuracy_level=4"] if precision in ("int8", "int4") else []
        run([str(BENCH_PY), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p",
             {"fp32": "fp32", "int8": "int8", "int4": "int4"}[precision], "-e", "cpu",
             "-c", str(CACHE / "genai-cache"), *opts])
    return out


def worker(runtime: str, model: Path, prompt: int, new: int, repeats: int) -> dict[str, float]:
    out = run([str(BENCH_PY), str(ROOT / "bench" / "comparison_workers.py"), runtime, str(model), "--prompt-tokens",
               str(prompt), "--new-tokens", str(new), "--repeats", str(repeats)])
    return json.loads(out.strip().splitlines()[-1])


def edgellm_runs(bundle_path: Path, args) -> dict[str, dict[str, float]]:
    bundle = load_bundle(bundle_path, verify=False)
    decode_prompt, prefill_prompt = random_prompt(bundle, args.decode_prompt_tokens), random_prompt(bundle, args.prefill_tokens)
    res = {"daemon": {}, "direct": {}}
    with serving(bundle_path) as address:
        d = [through_daemon(address, decode_prompt, args.new_tokens) for _ in range(args.repeats)]
        p = [through_daemon(address, prefill_prompt, 2) for _ in range(args.repeats)]
    res["daemon"]["decode_tokens_per_s"] = statistics.median(r[1] for r in d)
    res["daemon"]["prefill_tokens_per_s"] = args.prefill_tokens / statistics.median(r[0] for r in p)
    dd = [direct(bundle, decode_prompt, args.new_tokens, 0) for _ in range(args.repeats)]
    pd = [direct(bundle, prefill_prompt, 2, 0) for _ in range(args.repeats)]
    res["direct"]["decode_tokens_per_s"] = statistics.median(r[1] for r in dd)
    res["direct"]["prefill_tokens_per_s"] = args.prefill_tokens / statistics.median(r[0] for r in pd)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint folder or GGUF file (default: the demo model's GGUF)")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--runtimes", default="llama.cpp,genai", help="others beside edgellm")
    ap.add_argument("--decode-prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
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
        rows = edgellm_runs(edgellm_bundle(model, name, precision, not args.no_accuracy_gate), args)
        if "llama.cpp" in others:
            g = gguf_file(model, name, precision)
            rows["llama.cpp"] = {**worker("llama.cpp", g, args.decode_prompt_tokens, args.new_tokens, args.repeats)}
            rows["llama.cpp"]["prefill_tokens_per_s"] = worker("llama.cpp", g, args.prefill_tokens, 1,
                                                               args.repeats)["prefill_tokens_per_s"]
        if "genai" in others:
            try:
                gdir = genai_folder(hf_folder(model, name), name, precision)
                rows["genai"] = worker("genai", gdir, args.decode_prompt_tokens, args.new_tokens, args.repeats)
                rows["genai"]["prefill_tokens_per_s"] = worker("genai", gdir, args.prefill_tokens, 2,
                                                               args.repeats)["prefill_tokens_per_s"]
            except subprocess.CalledProcessError as e:
                print(f"  ORT GenAI failed at {precision}: {e}", flush=True)
        table[precision] = rows
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores ({_cpu_name()}); model {name}; decode: prompt "
          f"{args.decode_prompt_tokens}, {args.new_tokens} new tokens; prefill: {args.prefill_tokens} tokens; "
          f"batch 1, median of {args.repeats}")
    for precision, rows in table.items():
        daemon = rows["daemon"]
        print(f"{precision}:")
        for runtime, r in rows.items():
            ratio = "" if runtime == "daemon" else (
                f"   daemon/{runtime}: decode {daemon['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}x, "
                f"prefill {daemon['prefill_tokens_per_s'] / r['prefill_tokens_per_s']:.2f}x")
            print(f"  {runtime:10s} decode {r['decode_tokens_per_s']:7.1f} tok/s   prefill "
                  f"{r['prefill_tokens_per_s']:7.1f} tok/s{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "table": table}, indent=1))


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
