import struct

import msgpack
from jobbroker.broker.errors import (
    AuthenticationFailed,
    FrameTooLarge,
    IntegrityError,
    TlsMismatch,
    UnsupportedVersion,
)
from jobbroker.broker.protocol import auth
from jobbroker.broker.protocol.connection import Authenticated, ClientConnection, ServerConnection, State
from jobbroker.broker.protocol.framing import FrameDecoder, encode_frame
from jobbroker.broker.protocol.messages import (
    Deliver,
    ErrorReply,
    Hello,
    Reply,
    Stats,
    Welcome,
    decode,
    encode,
)

from tests.helpers import SECRET, connected_pair, credentials, exchange


def test_handshake_then_requests_and_replies() -> None:
    client = ClientConnection(SECRET, client="me")
    server = ServerConnection(credentials(), session=7, heartbeat=2.0)
    client.initiate()
    server_events = server.receive_data(client.data_to_send())
    assert server_events == [] and server.state is State.AWAIT_AUTHENTICATE
    client.receive_data(server.data_to_send())
    assert server.receive_data(client.data_to_send()) == [
        Authenticated(client="me", credential="default", role="admin")
    ]
    (welcome,) = client.receive_data(server.data_to_send())
    assert welcome == Welcome(session=7, heartbeat=2.0, max_frame_size=server._max_frame_size, role="admin")
    assert client.state is State.OPEN and server.state is State.OPEN

    client.send(Stats(id=1))
    assert server.receive_data(client.data_to_send()) == [Stats(id=1)]
    server.send(Reply(id=1, data={"queues": {}}))
    assert client.receive_data(server.data_to_send()) == [Reply(id=1, data={"queues": {}})]


def test_wrong_secret_is_refused_by_the_client_before_it_proves_anything() -> None:
    client = ClientConnection(b"w" * 32)
    server = ServerConnection(credentials(), session=1, heartbeat=5.0)
    client.initiate()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())  # the broker's proof does not match
    assert client.state is State.CLOSED
    assert isinstance(client.error, AuthenticationFailed)


def test_wrong_secret_is_refused_by_the_server() -> None:
    # A client that skips checking the broker's proof still cannot get in.
    server = ServerConnection(credentials(), session=1, heartbeat=5.0)
    client_nonce = auth.new_nonce()
    server.receive_data(encode_frame(encode(Hello(version=auth.PROTOCOL_VERSION, nonce=client_nonce))))
    challenge = decode(FrameDecoder().feed(server.data_to_send())[0])
    wrong = auth.client_proof(b"w" * 32, "default", client_nonce, challenge.nonce)  # type: ignore[attr-defined]
    events = server.receive_data(encode_frame(msgpack.packb({"op": "authenticate", "proof": wrong})))
    assert events == [] and server.state is State.CLOSED
    assert isinstance(server.error, AuthenticationFailed)
    (reply,) = [decode(f) for f in FrameDecoder().feed(server.data_to_send())]
    assert isinstance(reply, ErrorReply) and reply.code == "auth_failed"


def test_requests_before_the_handshake_close_the_connection() -> None:
    server = ServerConnection(credentials(), session=1, heartbeat=5.0)
    assert server.receive_data(encode_frame(encode(Stats(id=1)))) == []
    assert server.state is State.CLOSED and isinstance(server.error, AuthenticationFailed)
    assert server.receive_data(encode_frame(encode(Stats(id=2)))) == []  # input discarded


def test_unsupported_version_and_short_nonce() -> None:
    for hello in (Hello(version=99, nonce=b"n" * 32), Hello(version=1, nonce=b"short")):
        server = ServerConnection(credentials(), session=1, heartbeat=5.0)
        server.receive_data(encode_frame(encode(hello)))
        assert server.state is State.CLOSED


def test_malformed_request_after_auth_gets_an_error_reply_and_the_connection_goes_on() -> None:
    client, server = connected_pair()
    signer = client._signer
    assert signer is not None
    bad = signer.sign(msgpack.packb({"op": "watch", "id": 5, "job_ids": "nope"}))
    unknown = signer.sign(msgpack.packb({"op": "teleport", "id": 6}))
    wrong_direction = signer.sign(encode(Deliver(jobs=[])))
    events = server.receive_data(encode_frame(bad) + encode_frame(unknown) + encode_frame(wrong_direction))
    assert events == [] and server.state is State.OPEN
    replies = client.receive_data(server.data_to_send())
    assert [(r.id, r.code) for r in replies] == [(5, "malformed"), (6, "malformed"), (None, "malformed")]
    client.send(Stats(id=7))
    assert server.receive_data(client.data_to_send()) == [Stats(id=7)]


def test_altered_frame_after_auth_closes_the_connection() -> None:
    client, server = connected_pair()
    client.send(Stats(id=1))
    data = bytearray(client.data_to_send())
    data[6] ^= 0xFF
    assert server.receive_data(bytes(data)) == []
    assert server.state is State.CLOSED and isinstance(server.error, IntegrityError)


def test_injected_unsigned_frame_after_auth_closes_the_connection() -> None:
    _, server = connected_pair()
    server.receive_data(encode_frame(encode(Stats(id=1))))
    assert server.state is State.CLOSED and isinstance(server.error, IntegrityError)


def test_replayed_frame_closes_the_connection() -> None:
    client, server = connected_pair()
    client.send(Stats(id=1))
    frame = client.data_to_send()
    assert server.receive_data(frame) == [Stats(id=1)]
    assert server.receive_data(frame) == []
    assert isinstance(server.error, IntegrityError)


def test_oversized_frame_gets_an_error_and_closes() -> None:
    client, server = connected_pair(max_frame_size=1000)
    assert server.receive_data(struct.pack(">I", 5000)) == []
    assert server.state is State.CLOSED and isinstance(server.error, FrameTooLarge)
    (reply,) = client.receive_data(server.data_to_send())
    assert isinstance(reply, ErrorReply) and reply.code == "frame_too_large" and reply.id is None


def test_pipelined_requests_in_one_write() -> None:
    client, server = connected_pair()
    for i in range(100):
        client.send(Stats(id=i))
    events = server.receive_data(client.data_to_send())
    assert [e.id for e in events] == list(range(100))  # type: ignore[union-attr]
    exchange(client, server)


def test_every_handshake_failure_tells_the_peer_the_same_text() -> None:
    # Unknown names and wrong secrets must not be told apart on the wire (docs/security.md).
    texts = set()
    for credential, secret in (("default", b"w" * 32), ("nobody", SECRET)):
        server = ServerConnection(credentials(), session=1, heartbeat=5.0)
        client_nonce = auth.new_nonce()
        server.receive_data(
            encode_frame(encode(Hello(version=auth.PROTOCOL_VERSION, nonce=client_nonce, credential=credential)))
        )
        challenge = decode(FrameDecoder().feed(server.data_to_send())[0])
        proof = auth.client_proof(secret, credential, client_nonce, challenge.nonce)  # type: ignore[attr-defined]
        server.receive_data(encode_frame(msgpack.packb({"op": "authenticate", "proof": proof})))
        assert isinstance(server.error, AuthenticationFailed)
        (reply,) = [decode(f) for f in FrameDecoder().feed(server.data_to_send())]
        assert isinstance(reply, ErrorReply) and reply.code == "auth_failed"
        texts.add(reply.message)
    for bad_hello in (Hello(version=auth.PROTOCOL_VERSION, nonce=b"n" * 31), Stats(id=1)):
        server = ServerConnection(credentials(), session=1, heartbeat=5.0)
        server.receive_data(encode_frame(encode(bad_hello)))
        (reply,) = [decode(f) for f in FrameDecoder().feed(server.data_to_send())]
        texts.add(reply.message)  # type: ignore[attr-defined]
    assert texts == {"authentication failed"}


def test_a_hello_of_another_version_is_refused_in_clear() -> None:
    # A version says nothing of names or secrets: the peer is told plainly what to upgrade.
    for version in (1, 99):
        server = ServerConnection(credentials(), session=1, heartbeat=5.0)
        server.receive_data(encode_frame(encode(Hello(version=version, nonce=b"n" * 32))))
        assert server.state is State.CLOSED and isinstance(server.error, UnsupportedVersion)
        (reply,) = [decode(f) for f in FrameDecoder().feed(server.data_to_send())]
        assert isinstance(reply, ErrorReply) and reply.id is None and reply.code == "unsupported_version"
        assert f"protocol version {version} is not supported" in reply.message
        assert f"speaks version {auth.PROTOCOL_VERSION}" in reply.message


def test_the_client_raises_unsupported_version_when_the_broker_refuses_its_version() -> None:
    client = ClientConnection(SECRET)
    client.initiate()
    refusal = ErrorReply(id=None, code="unsupported_version", message="protocol version 2 is not supported")
    client.receive_data(encode_frame(encode(refusal)))
    assert client.state is State.CLOSED and isinstance(client.error, UnsupportedVersion)
    assert "protocol version 2 is not supported" in str(client.error)


def test_ops_the_broker_does_not_take_are_refused_with_their_id() -> None:
    client, server = connected_pair()
    signer = client._signer
    assert signer is not None
    frames = [
        {"op": "deliver", "id": 11, "jobs": []},
        {"op": "results", "id": 12, "items": []},
        {"op": "hello", "id": 13, "version": 1, "nonce": b"n" * 32},
        {"op": "results", "items": []},  # no id to give back
    ]
    server.receive_data(b"".join(encode_frame(signer.sign(msgpack.packb(f))) for f in frames))
    replies = client.receive_data(server.data_to_send())
    assert [(r.id, r.code) for r in replies] == [
        (11, "malformed"),
        (12, "malformed"),
        (13, "malformed"),
        (None, "malformed"),
    ]
    assert server.state is State.OPEN


def test_a_tls_client_at_a_plaintext_port_is_told_so() -> None:
    client_hello = bytes.fromhex("16030100f4010000f00303") + bytes(240)  # the start of a ClientHello
    for chunks in ([client_hello], [client_hello[:1], client_hello[1:]]):  # in one read, or split
        server = ServerConnection(credentials(), session=1, heartbeat=5.0)
        for chunk in chunks:
            server.receive_data(chunk)
        assert server.state is State.CLOSED and isinstance(server.error, TlsMismatch)
        assert "TLS client at a plaintext port" in str(server.error)
        (reply,) = [decode(f) for f in FrameDecoder().feed(server.data_to_send())]
        assert isinstance(reply, ErrorReply) and reply.code == "tls_mismatch"


def test_a_plaintext_client_answered_in_tls_is_told_so() -> None:
    client = ClientConnection(SECRET)
    client.initiate()
    client.data_to_send()
    client.receive_data(bytes.fromhex("150303000202"))  # a TLS alert record
    assert client.state is State.CLOSED and isinstance(client.error, TlsMismatch)
    assert "tls=" in str(client.error)


def test_after_the_handshake_no_bytes_are_taken_for_tls() -> None:
    client, server = connected_pair()
    client.send(Stats(id=0x1603))  # an ordinary frame, whatever its first bytes
    assert server.receive_data(client.data_to_send()) == [Stats(id=0x1603)]


def test_requests_may_follow_authenticate_before_the_welcome_arrives() -> None:
    # docs/protocol.md, "Handshake": the keys exist once the challenge is in, so a client may
    # pipeline its first requests behind its proof; the broker reads them after checking it.
    client = ClientConnection(SECRET)
    server = ServerConnection(credentials(), session=3, heartbeat=5.0)
    client.initiate()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())  # the challenge: the client sends its proof
    client.send(Stats(id=1))  # MACed as the client's frame 0, before any welcome
    events = server.receive_data(client.data_to_send())
    assert [type(e).__name__ for e in events] == ["Authenticated", "Stats"]


def test_a_body_nested_past_1024_levels_is_malformed_and_the_connection_goes_on() -> None:
    client, server = connected_pair()
    signer = client._signer
    assert signer is not None

    def body(arrays: int) -> bytes:  # {"op": "stats", "id": 1, "x": [[...[nil]...]]}
        return (
            b"\x83"
            + msgpack.packb("op")
            + msgpack.packb("stats")
            + msgpack.packb("id")
            + b"\x01"
            + msgpack.packb("x")
            + b"\x91" * arrays
            + b"\xc0"
        )

    events = server.receive_data(encode_frame(signer.sign(body(1023))))  # the map and 1023 arrays: 1024 levels
    assert events == [Stats(id=1)]
    assert server.receive_data(encode_frame(signer.sign(body(1024)))) == []
    (reply,) = client.receive_data(server.data_to_send())
    assert isinstance(reply, ErrorReply) and reply.code == "malformed" and reply.id is None
    assert server.state is State.OPEN
