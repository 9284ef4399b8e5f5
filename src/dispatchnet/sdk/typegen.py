"""Writes the SDK's public message types, src/dispatchnet/sdk/types.py: betterproto 2.0.0b7
dataclasses for every dispatch.v1 message and enum, without betterproto's service stubs
(the SDK speaks gRPC through dispatchnet.client's CoordinatorClient).

`make proto` runs it by path, so a stale or broken sdk/ never stops it:

    python src/dispatchnet/sdk/typegen.py DESCRIPTOR_SET OUT.py

DESCRIPTOR_SET is `protoc --include_imports --include_source_info --descriptor_set_out` of
proto/dispatch/v1/*.proto. The betterproto plugin would write the same module as
dispatch/v1/__init__.py, the package the protobuf stubs in generated/ already are; running
its generator here puts the dataclasses under dispatchnet.sdk.types instead.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

PACKAGE = "dispatch.v1"
HEADER = (
    "# The SDK's public message types: `make proto` writes this file with\n"
    "# src/dispatchnet/sdk/typegen.py (betterproto) from proto/dispatch/v1/*.proto.\n"
)


def generate(descriptor_set: bytes) -> str:
    """The module's source for a FileDescriptorSet (with imports and source info)."""
    from betterproto.plugin.models import monkey_patch_oneof_index

    # before any descriptor is parsed, as the plugin does
    monkey_patch_oneof_index()  # type: ignore[no-untyped-call]
    from betterproto.lib.google.protobuf import FileDescriptorSet
    from betterproto.lib.google.protobuf.compiler import CodeGeneratorRequest
    from betterproto.plugin.parser import generate_code

    files = list(FileDescriptorSet().parse(descriptor_set).file)
    for f in files:
        f.service = []  # messages and enums only
    request = CodeGeneratorRequest(
        file_to_generate=[f.name for f in files if f.package == PACKAGE], proto_file=files
    )
    chatter = io.StringIO()  # it prints a "Writing <file>" line per file on stderr
    with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
        response = generate_code(request)
    wanted = PACKAGE.replace(".", "/") + "/__init__.py"
    for out in response.file:
        if out.name == wanted:
            return HEADER + out.content
    raise SystemExit(f"betterproto wrote no {wanted}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: typegen.py DESCRIPTOR_SET OUT.py", file=sys.stderr)
        return 2
    Path(argv[1]).write_text(generate(Path(argv[0]).read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
