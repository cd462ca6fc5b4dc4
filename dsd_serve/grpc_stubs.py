"""The Python stubs of the gRPC contract `proto/dsd/v1/*.proto`, generated with grpc_tools.protoc into
`dsd_serve/pb/` (a build output, ignored by git).

Importing this module generates them when they are missing or were generated from other `.proto` contents (the
stubs record a digest of the protos, so copies with new file dates, as in a built bento, stay current); set-up
runs `python -m dsd_serve.grpc_stubs` to do it ahead of time.

    from dsd_serve.grpc_stubs import dsd_pb2, dsd_pb2_grpc
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent / "proto" / "dsd" / "v1"
STUBS_DIR = PACKAGE_DIR / "pb"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


def proto_digest() -> str:
    digest = hashlib.sha256()
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        digest.update(proto.name.encode() + b"\0" + proto.read_bytes())
    return digest.hexdigest()


def stale() -> bool:
    """True when a stub is missing or was generated from other protos (never without the proto sources)."""
    protos = list(PROTO_DIR.glob("*.proto"))
    if not protos:
        return False
    marker = STUBS_DIR / "__init__.py"
    if not marker.exists() or proto_digest() not in marker.read_text():
        return True
    return any(not (STUBS_DIR / f"{proto.stem}{suffix}").exists() for proto in protos for suffix in SUFFIXES)


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
        (generated / "__init__.py").write_text(
            f'"""Generated from proto/dsd/v1 by dsd_serve.grpc_stubs (protos sha256 {proto_digest()})."""\n'
        )
        for path in generated.iterdir():
            os.replace(path, STUBS_DIR / path.name)


if stale():
    generate()

from .pb import dsd_pb2, dsd_pb2_grpc  # noqa: E402

__all__ = ["dsd_pb2", "dsd_pb2_grpc", "generate", "stale"]

if __name__ == "__main__":
    print(f"gRPC stubs of {PROTO_DIR} are current in {STUBS_DIR}")
