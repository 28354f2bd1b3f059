"""One kept-alive HTTP/1.1 connection to the upstream, an asyncio Protocol (the pool is upstream.py).

Answers are parsed by aiohttp's response parser: llhttp in C, or its pure-Python twin when the
extension is absent (``aiohttp.http.HttpResponseParser`` is whichever is active). The connection
is aiohttp's BaseProtocol because an answer's body is an aiohttp StreamReader, which pauses and
resumes reading through its protocol when its buffer fills and drains (flow control), exactly as
in aiohttp's own client. Interim answers (100 Continue, 103 Early Hints) are skipped; a body is
framed by Content-Length, chunked coding or the close of the connection, and trailers are dropped.

One exchange at a time: ``request`` writes a request (its head and a body in hand in one write, or
the head and then a streamed body from a task) and returns the future of the answer's head. The
connection is reusable after an exchange only if the answer ended cleanly, the upstream did not
ask to close, and nothing else arrived.

Time: the upstream must make progress within ``timeout`` seconds whenever the sidecar waits on it,
for the head and for each part of the body, as aiohttp's ``sock_read``. One timer per exchange,
not one per read: a read only moves a deadline, and the timer, when it fires early, sleeps until
the deadline (a TimerHandle per read would cost more than the read). Time the sidecar itself
holds things up (the reader slow, so flow control paused reading; the client's body not here
yet) is not the upstream's, and moves the deadline too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader

from sidecar.errors import StaleConnection, UploadFailed, UpstreamFailed

Head = tuple[RawResponseMessage, StreamReader]
# An answer's body buffer: reading pauses above twice this much unread (aiohttp's default).
READ_BUFFER = 64 * 1024
_LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of the chunked coding (RFC 9112 §7.1); ``data`` is not empty."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class UpstreamConnection(BaseProtocol):
    __slots__ = (
        "_answer",
        "_body",
        "_client_turn",
        "_deadline",
        "_timeout",
        "_timer",
        "lost",
        "received",
        "reusable",
        "upload",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        super().__init__(loop)
        self._timeout = timeout
        self._answer: asyncio.Future[Head] | None = None
        self._body: StreamReader | None = None  # the answer's body, until it ends
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._client_turn = False  # the upload waits for the client's next bytes
        self.received = False  # a byte of the current answer came
        self.reusable = True  # False once an exchange ended in any way but cleanly
        self.upload: asyncio.Task[None] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()  # set when the connection is gone

    @property
    def usable(self) -> bool:
        """Open, and fit for another exchange."""
        transport = self.transport
        return self.reusable and transport is not None and not transport.is_closing()

    def request(
        self, data: bytes, body: AsyncIterator[bytes] | None, *, chunked: bool, head: bool
    ) -> asyncio.Future[Head]:
        """Send ``data`` (a request head, maybe with its whole body) and then ``body`` if streamed
        (chunk-coded when ``chunked``); the future of the answer's head. ``head``: a HEAD request,
        whose answer has no body whatever its fields say."""
        transport, loop = self.transport, self._loop
        if transport is None or transport.is_closing():  # closed by the upstream since it was handed out
            raise StaleConnection("the upstream closed the connection before the request")
        self._parser = HttpResponseParser(
            self, loop, READ_BUFFER, response_with_body=not head, read_until_eof=True, auto_decompress=False
        )
        self._answer = answer = loop.create_future()
        self.received = False
        transport.write(data)
        self._arm()
        if body is not None:
            self.upload = loop.create_task(self._upload(body, chunked))
        return answer

    def drop(self) -> None:
        """Close the connection now, whatever state it is in; a body still uploading stops."""
        self.reusable = False
        if self.upload is not None and not self.upload.done():
            self.upload.cancel()
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if data:  # bytes that answer nothing: the connection cannot be trusted with another request
                self._fail(UpstreamFailed("the upstream sent bytes no request asked for"))
            return
        if data:
            self.received = True
            self._deadline = self._loop.time() + self._timeout
        try:
            messages, _, _ = parser.feed_data(data)
        except Exception as error:
            failure = UpstreamFailed(f"the upstream's answer is not valid HTTP/1.1 ({type(error).__name__})")
            failure.__cause__ = error
            self._fail(failure)
            return
        for message, body in messages:
            self._on_message(message, body)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.reusable = False
        parser, self._parser = self._parser, None
        if parser is not None:
            try:
                parser.feed_eof()  # ends a body read until the close; refuses one that was cut short
            except Exception as error:
                self._fail(UpstreamFailed(f"the upstream closed the connection mid-answer ({error})"))
        answer = self._answer
        if answer is not None and not answer.done():
            failure = StaleConnection if not self.received else UpstreamFailed
            answer.set_exception(failure("the upstream closed the connection before it answered"))
        self._disarm()
        if not self.lost.done():
            self.lost.set_result(None)
        super().connection_lost(exc)

    def resume_reading(self, resume_parser: bool = True) -> None:
        # A StreamReader calls this on every read below its low-water mark: only a pause needs undoing.
        if self._reading_paused:
            super().resume_reading(resume_parser)

    # --- the answer ---------------------------------------------------------------------------------

    def _on_message(self, message: RawResponseMessage, body: StreamReader) -> None:
        code = message.code
        if 100 <= code < 200 and code != 101:
            return  # an interim answer: the final one follows
        answer = self._answer
        if answer is None or answer.done() or code == 101:  # a second answer, or a protocol switch
            self._fail(UpstreamFailed(f"the upstream sent an answer ({code}) no request asked for"))
            return
        if message.should_close:
            self.reusable = False
        self._body = body
        body.on_eof(self._ended)
        answer.set_result((message, body))

    def _ended(self) -> None:
        """The answer's body is complete: later bytes answer nothing, and the clock stops."""
        self._parser = None
        self._body = None
        self._disarm()

    def _fail(self, error: BaseException) -> None:
        """End the exchange with ``error``, given to whoever waits (for the head, or in the body),
        and close the connection."""
        self.reusable = False
        self._parser = None
        answer, body = self._answer, self._body
        if answer is not None and not answer.done():
            answer.set_exception(error)
        elif body is not None:
            self._body = None
            body.set_exception(error)
        self._disarm()
        if self.transport is not None:
            self.transport.abort()

    # --- the request body ---------------------------------------------------------------------------

    async def _upload(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Relay the body; a failure of the body itself ends the exchange with UploadFailed, a
        connection that closes ends the upload quietly (connection_lost has told the waiter)."""
        parts = aiter(body)
        while True:
            self._client_turn = True
            try:
                data = await anext(parts)
            except StopAsyncIteration:
                break
            except Exception as error:
                failure = UploadFailed(str(error) or type(error).__name__)
                failure.__cause__ = error
                self._fail(failure)
                return
            finally:
                self._client_turn = False
            if data and not await self._write(chunk(data) if chunked else data):
                return
        if chunked:
            await self._write(_LAST_CHUNK)

    async def _write(self, data: bytes) -> bool:
        """Write part of the body and wait while the upstream's buffer is full; False once the
        connection is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        self._deadline = self._loop.time() + self._timeout
        if self._paused:
            try:
                await self._drain_helper()
            except ConnectionError:
                return False
        return True

    # --- the clock ----------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._deadline = self._loop.time() + self._timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        now = self._loop.time()
        if self._reading_paused or self._client_turn:
            self._deadline = now + self._timeout  # the sidecar's side holds things up, not the upstream
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._timer = None
        self._fail(TimeoutError(f"the upstream sent nothing for {self._timeout:g} seconds"))
