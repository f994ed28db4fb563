"""Regenerate the Python code of the API from proto/ (run: python proto/generate.py [--check]).

The generated modules are committed so the daemon needs no protoc at run time; `--check` fails when
they differ from what the .proto files produce, which the test suite runs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
GENERATED = ["edgellm/v1/edgellm_pb2.py", "edgellm/v1/edgellm_pb2.pyi", "edgellm/v1/edgellm_pb2_grpc.py"]


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on every .proto file, writing under out_dir."""
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = str(files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def drift() -> list[str]:
    """Generated files whose committed copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [rel for rel in GENERATED
                if not (REPO_ROOT / rel).exists()
                or (Path(tmp) / rel).read_bytes() != (REPO_ROOT / rel).read_bytes()]


def main() -> int:
    if "--check" in sys.argv[1:]:
        stale = drift()
        if stale:
            print("generated code is out of date, run python proto/generate.py:", ", ".join(stale))
            return 1
        print("generated code matches proto/")
        return 0
    generate(REPO_ROOT)
    print("wrote", ", ".join(GENERATED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
