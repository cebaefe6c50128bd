"""An httpx transport that reads at most so many bytes of a response.

The OpenAI client reads a whole body before it parses it, error bodies included: a server (or a
proxy in front of it) sending megabytes would cost the worker that memory, and its text would
end up in a question's ``last_error``. The cap is checked against Content-Length when there is
one and counted on the bytes as they arrive when there is not (chunked, or a lying header).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2 as httpx  # the fork of httpx the openai client is built on


class ResponseTooLarge(httpx.ReadError):
    """A response over the cap; raised while reading, so the client gives the connection up."""


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, cap: int):
        self.stream, self.cap = stream, cap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self.stream:
            read += len(chunk)
            if read > self.cap:
                raise ResponseTooLarge(f"a response of more than {self.cap:,} bytes (DOCSRAG_LLM_MAX_RESPONSE_BYTES)")
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


class CappedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, cap: int):
        self.inner, self.cap = inner, cap

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cap:
            await response.aclose()
            raise ResponseTooLarge(f"a response of {int(declared):,} bytes, over the cap of {self.cap:,} "
                                   "(DOCSRAG_LLM_MAX_RESPONSE_BYTES)")
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_CappedStream(response.stream, self.cap), extensions=response.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()
