"""The package's build backend: setuptools, after generating the gRPC stubs.

pyproject.toml names this module as its in-tree PEP 517 backend, so no setup.py is needed. Before
any build hook runs, the protobuf and gRPC stubs (with .pyi type stubs) are generated from the
repository's proto/goodtriever/v1/goodtriever.proto into goodtriever_client/_proto/, with their
imports made package-relative so the installed package does not claim a top-level `goodtriever`
module. Generating on every build keeps the stubs matching the server's protocol.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import build_meta as _setuptools

HERE = Path(__file__).resolve().parent.parent
PROTO_ROOT_CANDIDATES = [
    HERE / ".." / ".." / "proto",  # in the repository
    HERE / "proto",  # a copy next to pyproject.toml
]
PROTO_FILE = Path("goodtriever") / "v1" / "goodtriever.proto"
OUT_DIR = HERE / "goodtriever_client" / "_proto"
GENERATED = ("goodtriever_pb2.py", "goodtriever_pb2.pyi", "goodtriever_pb2_grpc.py")


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    root = next((r for r in PROTO_ROOT_CANDIDATES if (r / PROTO_FILE).exists()), None)
    if root is None:
        raise SystemExit(
            f"cannot find {PROTO_FILE}: build from the goodtriever repository "
            "(clients/python) so that ../../proto is present"
        )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        str(root / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {PROTO_FILE}")
    gen_dir = OUT_DIR / "goodtriever" / "v1"
    for name in GENERATED:
        text = (gen_dir / name).read_text()
        text = re.sub(
            r"^from goodtriever\.v1 import goodtriever_pb2",
            "from . import goodtriever_pb2",
            text,
            flags=re.M,
        )
        (OUT_DIR / name).write_text(text)
    (OUT_DIR / "__init__.py").write_text(
        '"""Generated from proto/goodtriever/v1/goodtriever.proto; do not edit."""\n'
    )


# setuptools lists the packages (egg_info, the metadata hooks) before it builds, so the generated
# package must exist before any hook runs; grpcio-tools is a build requirement, so it is importable.
generate_stubs()

get_requires_for_build_wheel = _setuptools.get_requires_for_build_wheel
get_requires_for_build_sdist = _setuptools.get_requires_for_build_sdist
get_requires_for_build_editable = _setuptools.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_wheel = _setuptools.build_wheel
build_sdist = _setuptools.build_sdist
build_editable = _setuptools.build_editable
