"""How an answer reaches the caller: whole in one write, or streamed as it arrives.

    send    a whole answer (upstream's, read whole, or the gateway's own refusal):
            one write, then a wait for the caller bounded by send_timeout_s
    relay   a long or unframed answer, streamed; its upstream slot is given back
            the first time the caller is the slow side

Every wait for the caller goes through the connection's bounded drain
(gateway/protocol.py): an answer not taken within ``send_timeout_s`` ends the
connection and surfaces here as ``SendTimeout``, a ``ConnectionError`` like a
caller that went away. Neither is a failure of the gateway's: the request keeps
its status and the access line says why the caller did not get it all.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

from gateway.protocol import SendTimeout
from gateway.retry import Tally
from gateway.transport import Answer, Failure

_CHUNK = 64 * 1024


class Slot:
    """An upstream slot held by a streamed answer: given back once, whichever
    comes first, the answer's end or the first wait for a slow caller."""

    __slots__ = ("_slots",)

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


async def send(request: web.BaseRequest, response: web.StreamResponse) -> ConnectionError | None:
    """Send a whole answer in one write; a caller that does not take it within
    ``send_timeout_s`` loses the connection (gateway/protocol.py). Returns why
    the caller did not get all of it (``SendTimeout``, or the caller gone), or None."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError as exc:
        return exc
    return None


def unsent(exc: ConnectionError) -> str:
    """The access-log reason for an answer the caller did not get."""
    if isinstance(exc, SendTimeout):
        return str(exc)
    return "caller went away before the answer was sent"


async def relay(
    request: web.BaseRequest,
    answer: Answer,
    headers: CIMultiDict[str],
    tally: Tally,
    slot: Slot,
) -> tuple[web.StreamResponse, str | None]:
    """Stream a long (or unframed) answer back as it arrives; return the response
    and, if the caller did not get all of it, why (for the access line). The
    first time the caller is slower than upstream, the upstream slot is given
    back before waiting for it: a slow caller never holds a slot others need."""
    response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    try:
        writer = await response.prepare(request)
        assert isinstance(writer, StreamWriter)
        protocol = request.protocol
        while chunk := await answer.read(_CHUNK):
            await writer.write(chunk, drain=False)
            if protocol.writing_paused:
                slot.release()
                await writer.drain()  # within send_timeout_s (gateway/protocol.py)
        slot.release()  # upstream is done with: only the caller is left
        await response.write_eof()
        await writer.drain()  # write_eof() does not wait when it has nothing left to write
    except ConnectionError as exc:  # our write failed, or the caller did not take it in time
        return response, unsent(exc)
    except Failure as failed:
        # Headers are already on their way: the only honest signal left is to
        # cut the connection, so the caller sees a truncated answer, not a
        # complete-looking one.
        tally.failed(failed.kind)
        if request.transport is not None:
            request.transport.abort()
        return response, f"upstream failed mid-body ({failed.kind})"
    return response, None
