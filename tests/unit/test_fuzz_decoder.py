"""Property tests: whatever bytes arrive, the decoder yields messages or one typed protocol
error, never another exception, and never buffers without bound."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jobbroker.broker.errors import ProtocolError
from jobbroker.broker.protocol.connection import ServerConnection, State
from jobbroker.broker.protocol.framing import HEADER_SIZE, FrameDecoder, encode_frame
from jobbroker.broker.protocol.messages import decode

from tests.helpers import connected_pair, credentials

LIMIT = 4096
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=2000))
def test_decode_of_any_bytes_is_a_message_or_a_protocol_error(body: bytes) -> None:
    try:
        decode(body)
    except ProtocolError:
        pass


@FAST
@given(st.dictionaries(st.sampled_from(["op", "id", "queue", "payloads", "items", "job_ids", "x"]), msgpack_values))
def test_decode_of_any_map_is_a_message_or_a_protocol_error(wire: dict[str, object]) -> None:
    try:
        decode(msgpack.packb(wire))
    except ProtocolError:
        pass


@FAST
@given(st.lists(st.binary(max_size=600), max_size=20))
def test_frame_decoder_never_buffers_past_the_limit(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame_size=LIMIT)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except ProtocolError:
            decoder = FrameDecoder(max_frame_size=LIMIT)  # the stream is dead; a new one starts
        assert decoder.buffered <= LIMIT + HEADER_SIZE


@FAST
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_a_server_connection_survives_any_bytes_before_authentication(chunks: list[bytes]) -> None:
    server = ServerConnection(credentials(), session=1, heartbeat=5.0, max_frame_size=LIMIT)
    for chunk in chunks:
        assert server.receive_data(chunk) == []  # random bytes never authenticate
    assert server._decoder.buffered <= LIMIT + HEADER_SIZE
    if server.state is State.CLOSED:
        assert isinstance(server.error, ProtocolError) or server.error is None


@FAST
@given(st.lists(st.binary(max_size=300), max_size=10), st.booleans())
def test_an_authenticated_connection_survives_any_frames(bodies: list[bytes], signed: bool) -> None:
    client, server = connected_pair(max_frame_size=LIMIT)
    signer = client._signer
    assert signer is not None
    for body in bodies:
        frame = encode_frame(signer.sign(body) if signed else body)
        server.receive_data(frame)  # malformed: error replies; unsigned: closed
    if server.state is State.CLOSED:
        assert isinstance(server.error, ProtocolError)
    else:
        assert signed or not bodies  # an unsigned frame always closes
