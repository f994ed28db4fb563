#!/usr/bin/env bash
# Sets up .venv-bench/ (gitignored): the runtimes edgellm is compared with, kept out of .venv
# because onnxruntime-genai pins its own onnxruntime and llama-cpp-python compiles llama.cpp.
#   bash bench/setup_comparisons.sh          # once; about 15-25 minutes on 2 cores (the llama.cpp build)
# Versions are pinned so that a figure can be reproduced.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench
LLAMA_CPP_PYTHON=0.3.36
ORT_GENAI=0.18.0

python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel setuptools
# llama.cpp from source, built for this CPU (native SIMD, OpenMP threads), as a user would build it.
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install --no-binary llama-cpp-python --no-cache-dir -v "llama-cpp-python==$LLAMA_CPP_PYTHON"
# ONNX Runtime GenAI and its model builder (brings its own onnxruntime); the builder needs torch,
# transformers and onnx to read the checkpoint. CPU torch only.
"$VENV/bin/pip" install "onnxruntime-genai==$ORT_GENAI" onnx onnx_ir numpy sentencepiece safetensors gguf
# (torch: the CPU build; this machine's pip finds it in its find-links folder.)
"$VENV/bin/pip" install "torch==2.13.0"
"$VENV/bin/pip" install transformers
# convert_hf_to_gguf.py ships in llama-cpp-python's sdist (vendor/llama.cpp); keep a copy next to the venv.
SDIST_DIR=$(mktemp -d)
"$VENV/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$SDIST_DIR"
tar -xzf "$SDIST_DIR"/llama_cpp_python-*.tar.gz -C "$SDIST_DIR"
mkdir -p "$VENV/llama.cpp"
cp -r "$SDIST_DIR"/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py \
      "$SDIST_DIR"/llama_cpp_python-*/vendor/llama.cpp/conversion \
      "$SDIST_DIR"/llama_cpp_python-*/vendor/llama.cpp/gguf-py "$VENV/llama.cpp/"
rm -rf "$SDIST_DIR"
echo "ok: $VENV ready"
