"""Generate the Python code of the gRPC contract: `make protos` (= `python -m tools.protogen`).

protos/sampler/v1/sampler.proto -> sampler_service/gen/sampler/v1/sampler_pb2{.py,.pyi,_grpc.py},
with the pinned grpcio-tools (dev extra). A developer tool, outside the runtime packages and never
installed. The proto root is mapped to sampler_service/gen so the generated imports are absolute
(`from sampler_service.gen.sampler.v1 import sampler_pb2`). The generated files are committed and
never edited; tests/test_protos.py regenerates into a temporary folder and fails when the committed
ones differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
PROTOS = ("sampler/v1/sampler.proto",)
PACKAGE_PREFIX = "sampler_service/gen"
GENERATED = tuple(
    f"{PACKAGE_PREFIX}/{proto.removesuffix('.proto')}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into out_root; returns the generated files.

    Raises:
        RuntimeError: protoc failed (its messages are in the text).
    """
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "protoc",
        f"-I{PACKAGE_PREFIX}={PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(PROTO_ROOT / proto) for proto in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out_root / name for name in GENERATED]


def main() -> int:
    for path in generate(REPO_ROOT):
        print(path.relative_to(REPO_ROOT), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
