"""Workers that compare.py runs in .venv-bench: the same workload on llama.cpp and on ONNX Runtime GenAI.

    .venv-bench/bin/python bench/comparison_workers.py llama.cpp MODEL.gguf --prompt-tokens 128 --new-tokens 128
    .venv-bench/bin/python bench/comparison_workers.py genai GENAI_MODEL_DIR --prompt-tokens 512 --new-tokens 1

Prints one JSON line: prefill and decode tokens/s at batch 1 (greedy, end-of-sequence ignored), median of
--repeats. The prompt is --seed's random token ids in [100, vocab - 100), as compare.py and the daemon get.
Only stdlib, numpy and the runtime under test are imported here (this venv has no edgellm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, vocab - 100, n).tolist()


def llama_cpp(model: str, prompt_tokens: int, new_tokens: int, threads: int, seed: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False, logits_all=False)
    prompt = prompt_ids(llm.n_vocab(), prompt_tokens, seed)
    llm.reset()
    llm.eval(prompt[:4])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = prompt_tokens / (time.perf_counter() - t0)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = (new_tokens - 1) / (time.perf_counter() - t1) if new_tokens > 1 else 0.0
    return prefill, decode


def genai(model: str, prompt_tokens: int, new_tokens: int, threads: int, seed: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    config = og.Config(model)
    config.clear_providers()
    m = og.Model(config)
    vocab = json.load(open(os.path.join(model, "genai_config.json")))["model"]["vocab_size"]
    prompt = prompt_ids(vocab, prompt_tokens, seed)

    def run(n_prompt: list[int], n_new: int) -> tuple[float, float]:
        params = og.GeneratorParams(m)
        params.set_search_options(do_sample=False, max_length=len(n_prompt) + n_new, min_length=len(n_prompt) + n_new)
        gen = og.Generator(m, params)
        t0 = time.perf_counter()
        gen.append_tokens(n_prompt)  # prefill
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            gen.generate_next_token()
        decode = time.perf_counter() - t1
        return len(n_prompt) / prefill, (n_new - 1) / decode if n_new > 1 else 0.0

    run(prompt[:4], 2)  # warm-up
    return run(prompt, new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runtime", choices=["llama.cpp", "genai"])
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    fn = llama_cpp if a.runtime == "llama.cpp" else genai
    runs = [fn(a.model, a.prompt_tokens, a.new_tokens, a.threads, a.seed) for _ in range(a.repeats)]
    print(json.dumps({"prefill_tokens_per_s": statistics.median(r[0] for r in runs),
                      "decode_tokens_per_s": statistics.median(r[1] for r in runs)}))


if __name__ == "__main__":
    main()
