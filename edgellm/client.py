"""Client helpers shared by `edgellm chat`, `edgellm info` and the benchmarks."""

from __future__ import annotations

import grpc

from edgellm.v1 import edgellm_pb2_grpc as pb_grpc


def grpc_target(address: str) -> str:
    """'unix:/path', '/path' (a Unix socket) or 'host:port' -> a gRPC target string."""
    if address.startswith("unix:"):
        return address
    if address.startswith("/") or address.startswith("."):
        return f"unix:{address}"
    return address


def connect(address: str) -> tuple[grpc.Channel, pb_grpc.InferenceStub]:
    channel = grpc.insecure_channel(grpc_target(address))
    return channel, pb_grpc.InferenceStub(channel)
