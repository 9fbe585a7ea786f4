"""Length-prefixed framing (docs/protocol.md, "Frames"): a 4-byte big-endian length, then the body.

Pure: bytes in, frame bodies out. The declared length is checked against the limit as soon as
the 4-byte header is in, before any of the body is buffered.
"""

from __future__ import annotations

import struct

from jobbroker.broker.errors import FrameTooLarge

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "HEADER_SIZE", "FrameDecoder", "encode_frame"]

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
HEADER_SIZE = 4
_HEADER = struct.Struct(">I")


def encode_frame(body: bytes) -> bytes:
    """Prefix `body` with its length."""
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into frame bodies.

    Args:
        max_frame_size: the largest body accepted, in bytes.
    """

    __slots__ = ("_buffer", "_max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._max_frame_size = max_frame_size

    def allow(self, max_frame_size: int) -> None:
        """Accept frames up to `max_frame_size` from now on, if that is more than before."""
        self._max_frame_size = max(self._max_frame_size, max_frame_size)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every frame body now complete.

        Raises:
            FrameTooLarge: a header declared more than max_frame_size. The decoder keeps
                nothing of that frame; the stream can no longer be trusted.
        """
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buffer, offset)
            if size > self._max_frame_size:
                del buffer[:]
                raise FrameTooLarge(size, self._max_frame_size)
            start = offset + HEADER_SIZE
            if end - start < size:
                break
            frames.append(bytes(buffer[start : start + size]))
            offset = start + size
        if offset:
            del buffer[:offset]
        return frames
