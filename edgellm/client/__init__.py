"""edgellm's Python client: `Client` (blocking) and `AsyncClient` (asyncio). See docs/client.md.

It needs grpcio and the generated API (edgellm.v1) only: none of the daemon's or the build's code.
"""

from __future__ import annotations

from edgellm.client.aio import AsyncClient, AsyncConversation, AsyncGenerateStream, AsyncSession, AsyncSessionRequest
from edgellm.client.channel import grpc_target
from edgellm.client.errors import EdgeLLMError
from edgellm.client.messages import Chunk, Completion, Result, make_request
from edgellm.client.retry import NO_RETRIES, RetryPolicy
from edgellm.client.sync import Client, Conversation, GenerateStream, Session, SessionRequest
from edgellm.socket_trust import UntrustedSocket

__all__ = ["AsyncClient", "AsyncConversation", "AsyncGenerateStream", "AsyncSession", "AsyncSessionRequest", "Chunk",
           "Client", "Completion", "Conversation", "EdgeLLMError", "GenerateStream", "NO_RETRIES", "Result",
           "RetryPolicy", "Session", "SessionRequest", "UntrustedSocket", "grpc_target", "make_request"]
