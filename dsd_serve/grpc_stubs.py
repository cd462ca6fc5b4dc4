"""The Python stubs of the gRPC contract `proto/dsd/v1/*.proto`, generated with grpc_tools.protoc into
`dsd_serve/pb/` (a build output, ignored by git).

Importing this module generates them when they are missing or older than a `.proto`; set-up runs
`python -m dsd_serve.grpc_stubs` to do it ahead of time.

    from dsd_serve.grpc_stubs import dsd_pb2, dsd_pb2_grpc
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent / "proto" / "dsd" / "v1"
STUBS_DIR = PACKAGE_DIR / "pb"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def stale() -> bool:
    """True when a stub is missing or older than its `.proto` (never without the proto sources, e.g. in a wheel)."""
    for proto in PROTO_DIR.glob("*.proto"):
        for suffix in SUFFIXES:
            stub = STUBS_DIR / f"{proto.stem}{suffix}"
            if not stub.exists() or stub.stat().st_mtime < proto.stat().st_mtime:
                return True
    return False


def generate() -> None:
    """Compile every `.proto` into `dsd_serve/pb/`. The protos are mapped to the virtual path `dsd_serve/pb` so the
    generated modules import each other as `dsd_serve.pb.*`. Files are written to a scratch directory and moved
    into place, so concurrent processes never import a half-written stub."""
    from grpc_tools import protoc

    STUBS_DIR.mkdir(exist_ok=True)
    virtual = STUBS_DIR.relative_to(PACKAGE_DIR.parent).as_posix()
    with tempfile.TemporaryDirectory(dir=STUBS_DIR) as scratch:
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={virtual}={PROTO_DIR}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(proto) for proto in sorted(PROTO_DIR.glob("*.proto"))),
        ]
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR} (its message is above)")
        generated = Path(scratch) / virtual
        (generated / "__init__.py").write_text('"""Generated from proto/dsd/v1 by dsd_serve.grpc_stubs."""\n')
        for path in generated.iterdir():
            os.replace(path, STUBS_DIR / path.name)


if stale():
    generate()

from .pb import dsd_pb2, dsd_pb2_grpc  # noqa: E402

__all__ = ["dsd_pb2", "dsd_pb2_grpc", "generate", "stale"]

if __name__ == "__main__":
    print(f"gRPC stubs of {PROTO_DIR} are current in {STUBS_DIR}")
