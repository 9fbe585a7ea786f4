"""What the per-frame HMAC costs: frames per second through encode+frame+decode, with and
without the MAC, for a small request and a batch of 100 completions.

    python benchmarks/frame_mac.py [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobbroker.broker.protocol.auth import FrameSigner, FrameVerifier
from jobbroker.broker.protocol.framing import FrameDecoder, encode_frame
from jobbroker.broker.protocol.messages import Complete, Message, Submit, decode, encode

MESSAGES: dict[str, Message] = {
    "submit of 1 job": Submit(id=1, queue="squares", payloads=[7]),
    "complete of 100 jobs": Complete(id=1, items=[[i, i, i * i] for i in range(100)]),
}


def frames_per_second(message: Message, with_mac: bool, seconds: float) -> float:
    key = b"k" * 32
    signer, verifier, decoder = FrameSigner(key), FrameVerifier(key), FrameDecoder()
    count = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(1000):
            body = encode(message)
            payload = signer.sign(body) if with_mac else body
            for frame in decoder.feed(encode_frame(payload)):
                decode(verifier.verify(frame) if with_mac else frame)
        count += 1000
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(f"{'message':24} {'no MAC frames/s':>16} {'MAC frames/s':>14} {'MAC cost':>9}")
    for name, message in MESSAGES.items():
        plain = frames_per_second(message, False, args.seconds)
        maced = frames_per_second(message, True, args.seconds)
        print(f"{name:24} {plain:16,.0f} {maced:14,.0f} {plain / maced - 1:8.0%}")


if __name__ == "__main__":
    main()
