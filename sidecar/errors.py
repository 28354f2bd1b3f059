"""Every exception the sidecar raises on purpose.

    SidecarError
     ├── PolicyInvalid      a policy file (or set of files) failed validation; carries every PolicyError
     ├── SettingsInvalid    a flag or SIDECAR_* variable has a bad value; names the variable
     ├── StoreUnavailable   Redis could not answer within the store timeout (or refused)
     │    └── OutcomeUnknown a metering call was sent, but its reply never came
     ├── EmbeddedStoreFailed the bundled redis-server could not be started
     ├── BodyTooLarge       a streamed request body passed --max-body-size (stops the upload)
     ├── UpstreamFailed     the upstream could not be reached, or its connection or answer broke
     │    └── StaleConnection a kept-alive connection closed before any byte of the answer
     └── UploadFailed       the request body being relayed failed on the client's side

A late upstream raises TimeoutError, as asyncio does, not an UpstreamFailed.

A refusal (401/403/429) is not an exception: it is a value (see gate.Verdict). Storage
exceptions are translated into StoreUnavailable at the store boundary only.
"""

from __future__ import annotations

from dataclasses import dataclass


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


@dataclass(frozen=True, slots=True)
class PolicyError:
    """One problem in a policy file, located to the file, line and column (1-based)."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.col}: {where}{self.message}"


class PolicyInvalid(SidecarError):
    """The policy was refused; ``errors`` lists every problem found, in file order."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(error) for error in errors))


class SettingsInvalid(SidecarError):
    """A command-line flag or environment variable has a value the sidecar cannot use."""


@dataclass(frozen=True, slots=True)
class UnansweredCall:
    """A metering call the store may have run without the sidecar reading its reply: named in the
    store by the connection it went out on (``token``) and its sequence number there, and unable
    to write after ``deadline_us`` (store clock, microseconds)."""

    token: str
    seq: int
    deadline_us: int = 0

    def fields(self) -> list[str | int]:
        """The call as a journal entry keeps it (journal.py, the "call" or "void" field)."""
        return [self.token, self.seq, self.deadline_us]

    @classmethod
    def from_fields(cls, fields: list[str | int]) -> UnansweredCall:
        token, seq, deadline_us = fields
        return cls(str(token), int(seq), int(deadline_us))


class StoreUnavailable(SidecarError):
    """The store did not answer in time or refused the connection."""

    call: UnansweredCall | None = None  # set by OutcomeUnknown: the call may have run


class OutcomeUnknown(StoreUnavailable):
    """A metering call was written to the store, and its reply was lost with the connection or
    came after the store timeout: whether the script ran is not known here. If it wrote, it left
    a record under ``call`` (lib.lua remember_call), which the journal looks up later."""

    def __init__(self, reason: str, call: UnansweredCall) -> None:
        super().__init__(reason)
        self.call: UnansweredCall = call


class EmbeddedStoreFailed(SidecarError):
    """The embedded redis-server process could not be started."""


class BodyStalled(SidecarError):
    """No byte of a request body came for ``timeout`` seconds; raised inside the read, so a client
    that trickles a body (or stops sending one) does not hold a connection and an upstream upload
    open forever."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"no byte of the request body came for {timeout:g} seconds")


class BodyTooLarge(SidecarError):
    """A streamed request body passed the limit; raised inside the upload, so the upstream never
    receives it whole."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the request body is larger than {limit} bytes")


class UpstreamFailed(SidecarError):
    """The upstream could not be connected to, closed or reset the connection, or answered with
    what is not HTTP/1.1; raised from the cause (an OSError, the parser's error) when there is one."""


class StaleConnection(UpstreamFailed):
    """A kept-alive connection closed before any byte of the answer came: the upstream closed it
    while the request was on its way. Sending the request again on a new connection is safe when
    the request is idempotent and its body is still in hand (http/upstream.py)."""


class UploadFailed(SidecarError):
    """The request body being relayed to the upstream failed on the client's side: it outgrew the
    limit, stalled, broke its framing, or its sender left; raised from that cause, which
    guard.body_refusal reads."""
