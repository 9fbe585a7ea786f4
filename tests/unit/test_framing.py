import struct

import pytest
from jobbroker.broker.errors import FrameTooLarge
from jobbroker.broker.protocol.framing import FrameDecoder, encode_frame


def test_round_trip_many_frames_in_one_feed() -> None:
    bodies = [b"", b"a", b"hello" * 100]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(encode_frame(b) for b in bodies)) == bodies
    assert decoder.buffered == 0


def test_frames_split_at_every_byte() -> None:
    stream = encode_frame(b"first") + encode_frame(b"second")
    decoder = FrameDecoder()
    frames = []
    for i in range(len(stream)):
        frames += decoder.feed(stream[i : i + 1])
    assert frames == [b"first", b"second"]


def test_oversized_length_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(struct.pack(">I", 101))  # no body sent at all
    assert (info.value.size, info.value.limit) == (101, 100)
    assert decoder.buffered == 0


def test_frame_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    assert decoder.feed(encode_frame(b"x" * 100)) == [b"x" * 100]


def test_huge_declared_length_buffers_nothing() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 10)
    assert decoder.buffered == 0
