"""Prints the CPU that programs see (under qemu: the emulated one): machine, the kernel's HWCAP features that
ONNX Runtime's int8 kernels depend on, and what ONNX Runtime and PyTorch report. Run by bench/aarch64.sh."""

from __future__ import annotations

import os
import platform
import struct

# Bits of AT_HWCAP / AT_HWCAP2 on arm64 (Linux arch/arm64/include/uapi/asm/hwcap.h).
HWCAP = {"asimd": 1, "atomics": 8, "asimdhp": 10, "asimdrdm": 12, "asimddp": 20, "sve": 22, "asimdfhm": 23}
HWCAP2 = {"sve2": 1, "i8mm": 13, "bf16": 14, "sme": 23}
AT_HWCAP, AT_HWCAP2 = 16, 26


def auxv() -> dict[int, int]:
    data = open("/proc/self/auxv", "rb").read()
    return {k: v for k, v in struct.iter_unpack("QQ", data)}


def main() -> None:
    print("machine:", platform.machine(), "| QEMU_CPU:", os.environ.get("QEMU_CPU", "(unset)"))
    if platform.machine() == "aarch64":
        vec = auxv()
        hw, hw2 = vec.get(AT_HWCAP, 0), vec.get(AT_HWCAP2, 0)
        have = [n for n, b in HWCAP.items() if hw >> b & 1] + [n for n, b in HWCAP2.items() if hw2 >> b & 1]
        print("HWCAP features:", " ".join(have))
    import onnxruntime as ort
    print("onnxruntime:", ort.__version__, ort.get_device(), ort.get_available_providers())
    import torch
    print("torch:", torch.__version__, "cpu capability:", torch.backends.cpu.get_cpu_capability())


if __name__ == "__main__":
    main()
