#!/usr/bin/env bash
# Sets up .venv-bench/ (gitignored): the runtimes edgellm is compared with, kept out of .venv
# because onnxruntime-genai pins its own onnxruntime and llama-cpp-python compiles llama.cpp.
#   bash bench/setup_comparisons.sh          # once; about 15-25 minutes on 2 cores (the llama.cpp build)
# Versions are pinned so that a figure can be reproduced.
# llama.cpp is compiled once, from the source vendored in llama-cpp-python's sdist: the build gives
# both llama-server (.venv-bench/bin/llama-server, for bench/serve_compare.py) and the shared
# libraries that llama-cpp-python loads (for bench/compare.py), so both compare the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench
LLAMA_CPP_PYTHON=0.3.36
ORT_GENAI=0.18.0
JOBS="$(nproc)"

python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel setuptools
SRC="$VENV/src"
mkdir -p "$SRC"
if [ ! -d "$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON" ]; then
    "$VENV/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$SRC"
    tar -xzf "$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$SRC"
fi
LLAMA_SRC="$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
BUILD="$VENV/llama.cpp/build"
# llama.cpp built for this CPU (native SIMD, OpenMP threads), as a user would build it; shared
# libraries so that llama-cpp-python can load the very same ones. No web UI download, no curl.
SIMD=(-DGGML_NATIVE=ON)
if grep -qw amx_tile /proc/cpuinfo; then
    # -march=native would also compile ggml's AMX kernels, and a VM may list AMX yet fault on its tile
    # instructions (SIGILL in tinygemm_kernel_amx, measured on an AVX-512 VM): every other SIMD extension
    # this CPU lists, by name, without AMX.
    SIMD=(-DGGML_NATIVE=OFF)
    for f in avx avx2 fma f16c bmi2 avx_vnni avx512f avx512vbmi avx512_vnni avx512_bf16; do
        opt=$(echo "$f" | tr a-z A-Z | sed 's/AVX512F/AVX512/; s/AVX512VBMI/AVX512_VBMI/')
        if grep -qw "$f" /proc/cpuinfo; then SIMD+=("-DGGML_$opt=ON"); else SIMD+=("-DGGML_$opt=OFF"); fi
    done
fi
cmake -S "$LLAMA_SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    "${SIMD[@]}" -DGGML_OPENMP=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
cmake --build "$BUILD" --target llama-server llama -j "$JOBS"
mkdir -p "$VENV/bin"
ln -sf "$(realpath "$BUILD/bin/llama-server")" "$VENV/bin/llama-server"
# llama-cpp-python's Python bindings without a second compile of llama.cpp (LLAMA_BUILD=OFF);
# the libraries just built go where the package looks for them.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    "$VENV/bin/pip" install --no-cache-dir "$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
PKG_LIB="$("$VENV/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")')"
mkdir -p "$PKG_LIB"
cp -a "$BUILD"/bin/lib*.so* "$PKG_LIB/"
# ONNX Runtime GenAI and its model builder (brings its own onnxruntime); the builder needs torch,
# transformers and onnx to read the checkpoint. CPU torch only.
"$VENV/bin/pip" install "onnxruntime-genai==$ORT_GENAI" onnx onnx_ir numpy sentencepiece safetensors gguf aiohttp
# (torch: the CPU build; this machine's pip finds it in its find-links folder.)
"$VENV/bin/pip" install "torch==2.13.0"
"$VENV/bin/pip" install transformers
# convert_hf_to_gguf.py ships in the same vendored tree; keep a copy next to the venv.
cp -r "$LLAMA_SRC/convert_hf_to_gguf.py" "$LLAMA_SRC/conversion" "$LLAMA_SRC/gguf-py" "$VENV/llama.cpp/"
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
"$VENV/bin/llama-server" --version
echo "ok: $VENV ready"
