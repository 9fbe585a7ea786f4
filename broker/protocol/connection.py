"""One connection's protocol state, for either side, with no I/O (docs/protocol.md).

The I/O layer feeds received bytes in (receive_data, receive_eof), sends what data_to_send()
returns, and acts on the returned events. The handshake and the per-frame MACs live here, so
the layers above only ever see authenticated, well-typed messages.

Rules, as in h11: every legal handshake step is a row of _HANDSHAKE; anything else is a
protocol error. A protocol error that leaves the stream untrustworthy (oversized frame, bad
MAC, any handshake fault) queues one error frame, moves to CLOSED, keeps the cause in `error`
and discards all further input. A well-framed, authentic message that is merely malformed gets
an error reply and the connection goes on.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from jobbroker.broker.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    FrameTooLarge,
    MalformedMessage,
    ProtocolError,
    TlsMismatch,
    UsageError,
)
from jobbroker.broker.protocol import auth
from jobbroker.broker.protocol.credentials import DEFAULT_CREDENTIAL, MAX_SECRETS_PER_CREDENTIAL, Credential
from jobbroker.broker.protocol.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_frame
from jobbroker.broker.protocol.messages import (
    Authenticate,
    Challenge,
    Deliver,
    ErrorReply,
    Heartbeat,
    Hello,
    Message,
    Progressed,
    Reply,
    Request,
    Results,
    Revoked,
    Started,
    Welcome,
    decode,
    encode,
    request_id,
)

__all__ = ["Authenticated", "ClientConnection", "Role", "ServerConnection", "State"]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"  # server: nothing received yet
    AWAIT_AUTHENTICATE = "await_authenticate"  # server: challenge sent
    AWAIT_CHALLENGE = "await_challenge"  # client: hello sent
    AWAIT_WELCOME = "await_welcome"  # client: proof sent
    OPEN = "open"
    CLOSED = "closed"


# Every legal handshake step: (role, state, op received) -> next state.
_HANDSHAKE: dict[tuple[Role, State, str], State] = {
    (Role.SERVER, State.AWAIT_HELLO, Hello.op): State.AWAIT_AUTHENTICATE,
    (Role.SERVER, State.AWAIT_AUTHENTICATE, Authenticate.op): State.OPEN,
    (Role.CLIENT, State.AWAIT_CHALLENGE, Challenge.op): State.AWAIT_WELCOME,
    (Role.CLIENT, State.AWAIT_WELCOME, Welcome.op): State.OPEN,
}


def _accepts_when_open(role: Role, message: Message) -> bool:
    if role is Role.SERVER:
        return isinstance(message, Request | Heartbeat | Started)
    return isinstance(message, Reply | ErrorReply | Deliver | Results | Progressed | Revoked | Heartbeat)


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Server-side event: the handshake succeeded; requests may follow."""

    client: str
    credential: str
    role: str


Event = Message | Authenticated


# The first bytes of a TLS record: handshake (a ClientHello, a ServerHello) or alert, in any
# TLS version. No frame starts so: its length would be over 350 MB.
_TLS_RECORDS = (b"\x16\x03", b"\x15\x03")
# What a failed handshake tells the peer, whatever failed: a wrong secret, an unknown name, a
# bad nonce. One text, so that the answer does not say which names exist (docs/security.md).
AUTH_FAILED_TEXT = "authentication failed"


class _Connection:
    role: Role

    def __init__(self, max_frame_size: int, nonce: bytes | None) -> None:
        self._secret = b""  # the credential's secret in use, once known
        self._credential = DEFAULT_CREDENTIAL
        self._decoder = FrameDecoder(max_frame_size)
        self._max_frame_size = max_frame_size
        # The largest frame the peer takes: the broker announces its own in the welcome; the
        # broker assumes its clients take what it takes (the default is the same).
        self.peer_max_frame_size = max_frame_size
        self._nonce = nonce if nonce is not None else auth.new_nonce()
        self._peer_nonce = b""
        self._signer: auth.FrameSigner | None = None
        self._verifier: auth.FrameVerifier | None = None
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._head = b""  # the first bytes received, until there are two: is the peer TLS?
        self.state: State
        self.error: ProtocolError | None = None
        self.frames_received = 0
        self.frames_sent = 0

    # --- output ---------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message; after the handshake it is MACed.

        Raises:
            ConnectionClosed: the connection is closed.
            FrameTooLarge: the message would make a frame the peer refuses; nothing is queued
                (split the batch, or send less).
        """
        if self.state is State.CLOSED:
            raise ConnectionClosed("cannot send on a closed connection", self.error)
        body = encode(message)
        if len(body) + auth.MAC_SIZE > self.peer_max_frame_size:
            raise FrameTooLarge(len(body) + auth.MAC_SIZE, self.peer_max_frame_size)
        self._queue_body(body)

    def send_encoded(self, body: bytes) -> None:
        """Queue a message body already encoded (messages.encode_items); as send().

        Raises:
            ConnectionClosed: the connection is closed.
            FrameTooLarge: the body would make a frame the peer refuses; nothing is queued.
        """
        if self.state is State.CLOSED:
            raise ConnectionClosed("cannot send on a closed connection", self.error)
        if len(body) + auth.MAC_SIZE > self.peer_max_frame_size:
            raise FrameTooLarge(len(body) + auth.MAC_SIZE, self.peer_max_frame_size)
        self._queue_body(body)

    @property
    def bytes_to_send(self) -> int:
        """Bytes queued that data_to_send() has not yet returned."""
        return self._outgoing_size

    def _queue(self, message: Message) -> None:
        self._queue_body(encode(message))

    def _queue_body(self, body: bytes) -> None:
        self.frames_sent += 1
        if self._signer is not None:
            body = self._signer.sign(body)
        frame = encode_frame(body)
        self._outgoing_size += len(frame)
        self._outgoing.append(frame)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer (one write per loop turn)."""
        if not self._outgoing:
            return b""
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._outgoing_size = 0
        return data

    # --- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; return the events they complete. Never raises for bad input:
        see `error` and `state` afterwards."""
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        try:
            if len(self._head) < 2 and self.frames_received == 0:
                self._head += data[: 2 - len(self._head)]
                if self._head in _TLS_RECORDS and self.state is not State.OPEN:
                    raise self._tls_mismatch()
            for payload in self._decoder.feed(data):
                self.frames_received += 1
                self._receive_frame(payload, events)
                if self.state is State.CLOSED:
                    break
        except ProtocolError as exc:
            self._fail(exc)
        return events

    def receive_eof(self) -> None:
        """The peer closed its side."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED

    def close(self) -> None:
        """Closed by us: discard further input."""
        self.state = State.CLOSED

    def _tls_mismatch(self) -> TlsMismatch:
        raise NotImplementedError

    def _fail(self, exc: ProtocolError) -> None:
        self.error = exc
        if self.state is not State.CLOSED:
            self._queue(ErrorReply(id=None, code=exc.code, message=self._error_text(exc)))
            self.state = State.CLOSED

    def _error_text(self, exc: ProtocolError) -> str:
        return str(exc)

    def _receive_frame(self, payload: bytes, events: list[Event]) -> None:
        # A bad MAC raises IntegrityError, which is fatal: the stream can no longer be trusted.
        body = self._verifier.verify(payload) if self._verifier is not None else payload
        if self.state is not State.OPEN:
            self._handshake(decode(body), events)  # any fault during the handshake is fatal
            return
        try:
            message = decode(body)
        except MalformedMessage as exc:
            self._queue(ErrorReply(id=exc.request_id, code=exc.code, message=str(exc)))
            return
        if not _accepts_when_open(self.role, message):
            # The id, when the peer gave one, even for an op whose message type has none.
            self._queue(
                ErrorReply(
                    id=request_id(body), code=MalformedMessage.code, message=f"op {message.op!r} not accepted here"
                )
            )
            return
        events.append(message)

    def _handshake(self, message: Message, events: list[Event]) -> None:
        if isinstance(message, ErrorReply):
            raise AuthenticationFailed(f"peer refused the handshake: {message.message}")
        next_state = _HANDSHAKE.get((self.role, self.state, message.op))
        if next_state is None:
            raise AuthenticationFailed(f"unexpected {message.op!r} during the handshake ({self.state.value})")
        self._step(message, events)
        self.state = next_state

    def _step(self, message: Message, events: list[Event]) -> None:
        raise NotImplementedError

    def _start_session(self, client_nonce: bytes, server_nonce: bytes) -> None:
        to_broker, to_client = auth.derive_session_keys(self._secret, self._credential, client_nonce, server_nonce)
        if self.role is Role.SERVER:
            self._signer, self._verifier = auth.FrameSigner(to_client), auth.FrameVerifier(to_broker)
        else:
            self._signer, self._verifier = auth.FrameSigner(to_broker), auth.FrameVerifier(to_client)


def _check_hello_fields(version: int, nonce: bytes) -> None:
    if version != auth.PROTOCOL_VERSION:
        raise AuthenticationFailed(
            f"protocol version {version} is not supported (this side speaks {auth.PROTOCOL_VERSION})"
        )
    if len(nonce) != auth.NONCE_SIZE:
        raise AuthenticationFailed(f"nonce of {len(nonce)} bytes; {auth.NONCE_SIZE} required")


class ServerConnection(_Connection):
    """The broker's side of one connection.

    Args:
        credentials: the credentials clients may authenticate as, by name.
        session: the id the broker gives this connection, sent in the welcome.
        heartbeat: the heartbeat interval in seconds, sent in the welcome.
        max_frame_size: largest frame body accepted.
        nonce: the broker's nonce; random unless a test fixes it.
        leader: on a standby, the leading broker's advertised "HOST:PORT", sent in the welcome
            (docs/protocol.md, "Standbys"); None on the leader. May be set until the welcome.
    """

    role = Role.SERVER

    def __init__(
        self,
        credentials: Mapping[str, Credential],
        *,
        session: int,
        heartbeat: float,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        nonce: bytes | None = None,
        leader: str | None = None,
    ) -> None:
        super().__init__(max_frame_size, nonce)
        self.state = State.AWAIT_HELLO
        self.leader = leader
        self._credentials = credentials
        self._candidates: tuple[bytes, ...] = ()
        self.session = session
        self.heartbeat = heartbeat
        self.client_name = ""
        self.credential: Credential | None = None  # known once authenticated
        self.claimed_credential = ""  # the name the hello asked for, for logs

    def _tls_mismatch(self) -> TlsMismatch:
        return TlsMismatch("a TLS client at a plaintext port: this broker runs without --tls-cert")

    def _error_text(self, exc: ProtocolError) -> str:
        # The cause stays in `error`, for the broker's log; the peer learns only that it failed.
        return AUTH_FAILED_TEXT if isinstance(exc, AuthenticationFailed) else str(exc)

    def _step(self, message: Message, events: list[Event]) -> None:
        if isinstance(message, Hello):
            _check_hello_fields(message.version, message.nonce)
            self._peer_nonce = message.nonce
            self.client_name = message.client[:200]
            self.claimed_credential = self._credential = message.credential[:200]
            known = self._credentials.get(self._credential)
            # An unknown name gets a decoy proof, so that names cannot be probed for.
            self._candidates = known.secrets if known is not None else (auth.new_nonce(),)
            proofs = [auth.server_proof(s, self._credential, message.nonce, self._nonce) for s in self._candidates]
            self._queue(Challenge(version=auth.PROTOCOL_VERSION, nonce=self._nonce, proofs=proofs))
        elif isinstance(message, Authenticate):
            credential = self._credentials.get(self._credential)
            for secret in self._candidates:
                expected = auth.client_proof(secret, self._credential, self._peer_nonce, self._nonce)
                if credential is not None and auth.proof_matches(expected, message.proof):
                    self._secret = secret
                    break
            else:
                reason = "wrong secret" if credential is not None else "unknown credential"
                raise AuthenticationFailed(f"{reason} for credential {self._credential!r}")
            self.credential = credential
            self._start_session(self._peer_nonce, self._nonce)
            self._queue(
                Welcome(
                    session=self.session,
                    heartbeat=self.heartbeat,
                    max_frame_size=self._max_frame_size,
                    role=credential.role,
                    leader=self.leader,
                )
            )
            events.append(Authenticated(client=self.client_name, credential=credential.name, role=credential.role))


class ClientConnection(_Connection):
    """The client's side of one connection. Call initiate() first, then send its output.

    Args:
        secret: the credential's secret.
        credential: the credential's name.
        client: a short name for the broker's logs and stats.
        max_frame_size: largest frame body accepted.
        nonce: the client's nonce; random unless a test fixes it.
    """

    role = Role.CLIENT

    def __init__(
        self,
        secret: bytes,
        *,
        credential: str = DEFAULT_CREDENTIAL,
        client: str = "",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        nonce: bytes | None = None,
    ) -> None:
        super().__init__(max_frame_size, nonce)
        self._secret = secret
        self._credential = credential
        self.state = State.AWAIT_CHALLENGE
        self._client_name = client
        self._initiated = False
        self.welcome: Welcome | None = None

    def _tls_mismatch(self) -> TlsMismatch:
        return TlsMismatch("the broker answered in TLS: connect with tls= (--tls-ca, $JOBBROKER_TLS_CA)")

    def initiate(self) -> None:
        """Queue the hello."""
        if self._initiated:
            raise UsageError("initiate() called twice")
        self._initiated = True
        self._queue(
            Hello(
                version=auth.PROTOCOL_VERSION, nonce=self._nonce, client=self._client_name, credential=self._credential
            )
        )

    def _step(self, message: Message, events: list[Event]) -> None:
        if isinstance(message, Challenge):
            _check_hello_fields(message.version, message.nonce)
            expected = auth.server_proof(self._secret, self._credential, self._nonce, message.nonce)
            proofs = message.proofs[:MAX_SECRETS_PER_CREDENTIAL]
            if not any(auth.proof_matches(expected, proof) for proof in proofs):
                raise AuthenticationFailed(
                    f"broker proof does not match: wrong secret or unknown credential {self._credential!r}, "
                    "or not our broker"
                )
            self._queue(
                Authenticate(proof=auth.client_proof(self._secret, self._credential, self._nonce, message.nonce))
            )
            self._start_session(self._nonce, message.nonce)
        elif isinstance(message, Welcome):
            self.welcome = message
            self.peer_max_frame_size = message.max_frame_size
            self._decoder.allow(message.max_frame_size)  # the broker sends frames up to its own limit
            events.append(message)
