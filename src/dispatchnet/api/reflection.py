"""Server reflection that carries the .proto comments, so `grpcurl describe` shows the docs.

The generated *_pb2 modules embed descriptors without source info. `make proto` also writes
a FileDescriptorSet with comments; this servicer swaps those richer descriptors in for our
own files in every reflection answer and leaves everything else as the stock servicer does.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

DESCRIPTOR_SET = "descriptors.binpb"


def _clear_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    # protoc fills json_name (lowerCamelCase); the stock servicer's descriptors have none, so
    # grpcurl prints the .proto field names. Keep it that way.
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _clear_json_names(m.nested_type)


def documented_files() -> dict[str, bytes]:
    raw = resources.files("dispatch.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    fds = descriptor_pb2.FileDescriptorSet.FromString(raw)
    for f in fds.file:
        _clear_json_names(f.message_type)
    return {f.name: f.SerializeToString() for f in fds.file}


class DocumentedReflection(ReflectionServicer):
    def __init__(self, service_names: tuple[str, ...], documented: dict[str, bytes]) -> None:
        super().__init__(service_names)
        self.documented = documented

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: Any,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for resp in super().ServerReflectionInfo(request_iterator, context):
            if resp.HasField("file_descriptor_response"):
                files = resp.file_descriptor_response.file_descriptor_proto
                for i, data in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(data).name
                    if name in self.documented:
                        files[i] = self.documented[name]
            yield resp


def enable(service_names: tuple[str, ...], server: Any) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflection(names, documented_files()), server
    )
