"""How a bundle's step scales with its rows, kernel group by kernel group, in ONNX Runtime on this CPU.

    python bench/kernel_scaling.py [--bundle B] [--position 200] [--chunk 16] [--rounds 5] [--repeats 30]

Times a step of 1, 2, 4 and 8 decode rows, and of 8 rows plus a --chunk-token prompt chunk (a mixed step), three ways:
- "step": the bundle's whole graph through the CPU backend, as the daemon runs it;
- "linear": the bundle's own weight matrices alone (its MatMulNBits, or MatMul in an fp32 bundle; the vocabulary
  projection left out), each on the step's tokens;
- "attention": its GroupQueryAttention nodes alone, over a KV cache (of the bundle's type) holding --position
  tokens per row.
Each way runs in its own process (two sessions in one process were seen to shift each other's step times by up
to 17%, in either direction, depending on which ran first), once per round, in alternating rounds. Printed: ms
per step, median (min..max) over the rounds; "tok/s × 1 row", the tokens per second of R rows over one row's
(R × t1 / tR, what many streams can gain at most); and the rate at which attention reads the KV cache, beside
this machine's read bandwidth. docs/mixed-steps.md has what it shows on the build machine and why it bounds the
8-stream targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare import cpu_flags  # noqa: E402
from daemon_overhead import alternating_rounds, bundle_path  # noqa: E402

from build_engine.weight_quant import LM_HEAD_NODE  # noqa: E402
from bundle_format.bundle import Bundle, load_bundle  # noqa: E402
from bundle_format.kv_cache import KvCacheLayout  # noqa: E402
from daemon.backend import StepRow  # noqa: E402
from daemon.backend_onnx import create_cpu_backend, create_session  # noqa: E402
from edgellm.bench import measure_read_bandwidth  # noqa: E402

PARTS = ("step", "linear", "attention")
DECODE_ROWS = (1, 2, 4, 8)


def cases(chunk: int) -> list[tuple[str, int, int]]:
    """(label, decode rows, prompt tokens) of every timed step."""
    return [(f"{r}", r, 0) for r in DECODE_ROWS] + [(f"8 + {chunk}", 8, chunk)]


def linear_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's weight matrices (vocabulary projection aside) as one graph: input x{K} [tokens, K] feeds every
    matrix of K input rows, each matrix's output its own graph output."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, used, widths = [], set(), set()
    for node in model.graph.node:
        if LM_HEAD_NODE in (node.name, node.output[0]):
            continue
        if node.op_type == "MatMulNBits":
            k = next(a.i for a in node.attribute if a.name == "K")
        elif node.op_type == "MatMul" and node.input[1] in inits:
            k = inits[node.input[1]].dims[0]
        else:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0], copy.output[0] = f"x{k}", f"y{len(nodes)}"
        nodes.append(copy)
        used.update(copy.input[1:])
        widths.add(k)
    inputs = [onnx.helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, ["tokens", k])
              for k in sorted(widths)]
    outputs = [onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes]
    graph = onnx.helper.make_graph(nodes, "linear", inputs, outputs, [inits[name] for name in used if name])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def attention_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's GroupQueryAttention nodes alone, all fed the same `qkv` [rows, longest row, q+k+v width]."""
    inits = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input}
    nodes, inputs, used, outputs = [], {}, set(), []
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0] = "qkv"
        copy.output[0] = f"attn{len(nodes)}"
        nodes.append(copy)
        for name in copy.input[1:]:
            if name in graph_inputs:
                inputs[name] = graph_inputs[name]
            elif name in inits:
                used.add(name)
        outputs += [onnx.helper.make_tensor_value_info(copy.output[0], onnx.TensorProto.FLOAT, None),
                    *(o for o in model.graph.output if o.name in copy.output[1:])]
        head_dim = graph_inputs[copy.input[3]].type.tensor_type.shape.dim[3].dim_value
        width = (attrs["num_heads"] + 2 * attrs["kv_num_heads"]) * head_dim
    qkv = onnx.helper.make_tensor_value_info("qkv", onnx.TensorProto.FLOAT, ["rows", "max_q", width])
    graph = onnx.helper.make_graph(nodes, "attention", [qkv, *inputs.values()], outputs, [inits[n] for n in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def session(model: onnx.ModelProto, folder: str) -> ort.InferenceSession:
    """A session with the daemon's threading settings (daemon/backend_onnx.py); the graph saved with external
    data, as a 1B model's weights do not fit one protobuf."""
    path = Path(folder) / "part.onnx"
    onnx.save(model, path, save_as_external_data=True, location="part.onnx.data")
    return create_session(path)


def timed(run, repeats: int, evict: np.ndarray) -> float:
    """Median ms of run() over repeats calls, after three to warm up. Before each timed call a read of `evict`
    empties the CPU's caches, as in the daemon a step's weights push the KV cache out (and the cache the weights)."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        evict.sum()
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def worker(part: str, loaded: Bundle, position: int, chunk: int, repeats: int) -> dict[str, float]:
    """ms per step of every case, for one part, in this process."""
    rng = np.random.default_rng(0)
    evict = np.ones(1 << 26, np.float32)  # 256 MB, more than any CPU's last-level cache
    result = {}
    if part == "step":
        backend = create_cpu_backend(loaded, 9)
        for label, rows, prompt in cases(chunk):
            if not prompt:  # the daemon's decode step: its fixed buffers per row count
                args = (list(range(rows)), [100 + s for s in range(rows)], [position] * rows)
                result[label] = timed(lambda args=args: backend.decode(*args), repeats, evict)
                continue
            step = [StepRow(s, [100 + s], position) for s in range(rows)]
            step.append(StepRow(rows, list(range(200, 200 + prompt)), position))
            result[label] = timed(lambda step=step: backend.forward(step), repeats, evict)
        return result
    model = onnx.load(loaded.graph_path)
    with tempfile.TemporaryDirectory(prefix="edgellm-kernels-") as folder:
        if part == "linear":
            graph = linear_graph(model)
            sess = session(graph, folder)
            for label, rows, prompt in cases(chunk):
                io = sess.io_binding()
                for i in graph.graph.input:
                    k = i.type.tensor_type.shape.dim[1].dim_value
                    io.bind_cpu_input(i.name, rng.standard_normal((rows + prompt, k), np.float32))
                for o in graph.graph.output:
                    io.bind_output(o.name, "cpu")
                result[label] = timed(lambda io=io: sess.run_with_iobinding(io), repeats, evict)
            return result
        graph = attention_graph(model)
        sess = session(graph, folder)
        width = graph.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        for label, rows, prompt in cases(chunk):
            total = rows + (1 if prompt else 0)  # the chunk is a row of its own, padded to max_q like the rest
            max_q = max(1, prompt)
            io = sess.io_binding()
            io.bind_cpu_input("qkv", rng.standard_normal((total, max_q, width), np.float32))
            seqlens = np.full(total, position, np.int32)
            lengths = np.ones(total, np.int32)
            if prompt:
                seqlens[-1], lengths[-1] = position + prompt - 1, prompt
            feeds = {"seqlens_k": seqlens, "query_lengths": lengths}
            caches = []  # bound by address below: they must live as long as the binding
            for i in graph.graph.input[1:]:
                if i.name in feeds:
                    io.bind_cpu_input(i.name, feeds[i.name])
                elif i.name.startswith("past_"):
                    dims = [total] + [d.dim_value for d in i.type.tensor_type.shape.dim[1:]]
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                    cache = (rng.standard_normal(dims) * (30 if dtype == np.int8 else 1)).astype(dtype)
                    caches.append(cache)
                    io.bind_input(i.name, "cpu", 0, dtype, dims, cache.ctypes.data)
                    io.bind_output(i.name.replace("past_", "present_"), "cpu", 0, dtype, dims, cache.ctypes.data)
            for o in graph.graph.output:
                if o.name.startswith("attn"):
                    io.bind_output(o.name, "cpu")
            result[label] = timed(lambda io=io, caches=caches: sess.run_with_iobinding(io), repeats, evict)
    return result


def kv_bytes_per_row(kv: KvCacheLayout, position: int) -> int:
    """Bytes of K and V that one decode row's attention reads at `position`."""
    return 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * kv.itemsize * (position + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--position", type=int, default=200, help="tokens already in each row's cache")
    ap.add_argument("--chunk", type=int, default=16, help="prompt tokens of the mixed step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30, help="steps timed per case and process (median taken)")
    ap.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bundle = bundle_path(args.bundle)
    loaded = load_bundle(bundle, verify=False)
    if loaded.manifest.get("target", "cpu") != "cpu":
        ap.error(f"{bundle} is a {loaded.manifest['target']} bundle: this measures ONNX Runtime's CPU kernels")
    max_seq = loaded.kv_cache.max_seq
    if args.position < 0 or args.chunk < 1 or args.position + args.chunk >= max_seq:
        ap.error(f"--position {args.position} with a --chunk of {args.chunk} does not fit this bundle's "
                 f"{max_seq}-token cache")
    if args.worker:
        print(json.dumps(worker(args.worker, loaded, args.position, args.chunk, args.repeats)))
        return

    def run_once(part: str) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--worker", part, "--bundle", str(bundle), "--position", str(args.position),
               "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
        return json.loads(subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout)

    bandwidth = [measure_read_bandwidth(1 << 28) / 1e9]
    runs = alternating_rounds(list(PARTS), args.rounds, run_once)
    bandwidth.append(measure_read_bandwidth(1 << 28) / 1e9)
    print(f"{bundle.name}: position {args.position}, {args.rounds} alternating rounds, ms per step: median (min..max); "
          f"read bandwidth {min(bandwidth):.1f}-{max(bandwidth):.1f} GB/s; CPU flags: {' '.join(cpu_flags()) or '?'}")
    print("| rows | " + " | ".join(f"{p} ms | tok/s × 1 row" for p in PARTS) + " | attention reads KV at |")
    print("|---" * (2 * len(PARTS) + 2) + "|")
    kv_row = kv_bytes_per_row(loaded.kv_cache, args.position)
    for label, rows, prompt in cases(args.chunk):
        cells = []
        for part in PARTS:
            ms = [r[label] for r in runs[part]]
            gain = [rows * r["1"] / r[label] for r in runs[part]]
            cells.append(f"{statistics.median(ms):.2f} ({min(ms):.2f}..{max(ms):.2f})")
            cells.append(f"{statistics.median(gain):.2f}×" if not prompt else "")
        rate = [rows * kv_row / (r[label] / 1e3) / 1e9 for r in runs["attention"]]
        cells.append(f"{statistics.median(rate):.1f} GB/s" if not prompt else "")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
