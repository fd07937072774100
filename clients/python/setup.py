"""Build hook: generate the protobuf and gRPC stubs from the repository's .proto file.

The stubs are written into goodtriever_client/_proto/ with their imports made package-relative,
so the installed package does not claim a top-level `goodtriever` module.
"""

import os
import re

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT_CANDIDATES = [
    os.path.join(HERE, "..", "..", "proto"),  # in the repository
    os.path.join(HERE, "proto"),  # a copy next to setup.py (sdists)
]
PROTO_FILE = os.path.join("goodtriever", "v1", "goodtriever.proto")
OUT_DIR = os.path.join(HERE, "goodtriever_client", "_proto")


def generate_stubs():
    from grpc_tools import protoc

    import grpc_tools

    root = next(
        (r for r in PROTO_ROOT_CANDIDATES if os.path.exists(os.path.join(r, PROTO_FILE))),
        None,
    )
    if root is None:
        raise SystemExit(
            f"cannot find {PROTO_FILE}: build from the goodtriever repository "
            "(clients/python) so that ../../proto is present"
        )
    os.makedirs(OUT_DIR, exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        os.path.join(root, PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed on " + PROTO_FILE)
    gen_dir = os.path.join(OUT_DIR, "goodtriever", "v1")
    for name in ("goodtriever_pb2.py", "goodtriever_pb2_grpc.py"):
        with open(os.path.join(gen_dir, name)) as f:
            text = f.read()
        text = re.sub(
            r"^from goodtriever\.v1 import goodtriever_pb2",
            "from . import goodtriever_pb2",
            text,
            flags=re.M,
        )
        with open(os.path.join(OUT_DIR, name), "w") as f:
            f.write(text)
    with open(os.path.join(OUT_DIR, "__init__.py"), "w") as f:
        f.write('"""Generated from proto/goodtriever/v1/goodtriever.proto; do not edit."""\n')


class BuildWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


# setuptools lists the packages (egg_info) before build_py runs, so the generated package must
# exist already; grpcio-tools is a build requirement, so it is importable here.
generate_stubs()
setup(cmdclass={"build_py": BuildWithStubs})
