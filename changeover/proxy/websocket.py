"""WebSocket framing on the proxy's tunnel path (RFC 6455 §5.2): where frames begin, and close frames.

The proxy never looks inside a frame. For a tunnel that is a WebSocket upgrade, each direction has
a `FrameTracker` that reads only frame headers and skips payloads by their length, so it knows
whether the byte stream is at a frame boundary. That is what lets the proxy end a tunnel it must cut
(drain limit, retire timeout, `tunnel_idle_timeout`, shutdown) with a close frame, status 1001 (going
away), instead of a bare TCP close the client reports as 1006: a close frame written in the middle
of a frame that is still being relayed would corrupt the stream, so it is written only at a boundary.

A read that falls inside a payload (the common case for large messages) costs one comparison and
one subtraction; headers are parsed only where frames start.
"""

from __future__ import annotations

import os
import struct

GOING_AWAY = 1001
SENT_CLOSE, SENT_NOTHING = 1, 2
OP_CLOSE = 0x8
_MAX_HEADER = 14                           # 2 + 8 (64-bit length) + 4 (mask)


def close_frame(code: int = GOING_AWAY, reason: bytes = b"", *, masked: bool) -> bytes:
    """A close frame: unmasked from the server side (to the client), masked from the client side
    (to the app), as RFC 6455 §5.1 requires of each direction."""
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + key + body


class FrameTracker:
    """Frame boundaries of one direction of a WebSocket stream.

    `remaining`: payload bytes of the current frame still to come (0 at a boundary or inside a
    header); `head`: the bytes of a header split across reads; `closed`: a close frame went by (the
    closing handshake has begun: nothing more is injected); `broken`: bytes that are not frames (an
    extension or a protocol the proxy does not know): boundaries are unknown from then on; `sent`:
    the proxy ended this direction (SENT_CLOSE: with its close frame, SENT_NOTHING: without)."""

    __slots__ = ("broken", "closed", "head", "remaining", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.remaining = 0
        self.head = b""
        self.closed = False
        self.broken = False

    @property
    def at_boundary(self) -> bool:
        return not self.remaining and not self.head and not self.broken

    def feed(self, data: bytes | bytearray | memoryview, stop: bool = False) -> int:
        """Account for `data` relayed in this direction. With `stop`, return the offset of the
        first frame boundary in `data` (0: it starts at one) without consuming past it; else (or
        when no boundary comes) consume everything and return -1."""
        n = len(data)
        r = self.remaining
        if r >= n and not stop:            # the hot path: inside a payload
            self.remaining = r - n
            return -1
        if self.broken:
            return -1
        i = 0
        while True:
            if r:
                if r > n - i or (r == n - i and not stop):
                    self.remaining = r - (n - i)
                    return -1
                i += r
                r = 0
            self.remaining = 0
            if stop and not self.head:
                return i
            if i >= n:
                return -1
            # a frame header starts at i (maybe continued from the previous read)
            if self.head:
                take = bytes(self.head) + bytes(data[i:i + _MAX_HEADER])
                base = len(self.head)
            else:
                take = bytes(data[i:i + _MAX_HEADER])
                base = 0
            need = _header_size(take)
            if need < 0 or len(take) < need:
                if len(take) >= _MAX_HEADER:       # cannot happen with a valid header
                    self.broken = True
                    return -1
                self.head = take
                return -1
            b0, b1 = take[0], take[1]
            if b0 & 0x70 or (b0 & 0x0F) not in (0, 1, 2, 8, 9, 10):
                self.broken = True                 # RSV bits (an extension) or an unknown opcode
                return -1
            if b0 & 0x0F == OP_CLOSE:
                self.closed = True
            ln = b1 & 0x7F
            if ln == 126:
                ln = (take[2] << 8) | take[3]
            elif ln == 127:
                ln = struct.unpack_from("!Q", take, 2)[0]
            self.head = b""
            i += need - base
            r = ln


def _header_size(b: bytes) -> int:
    """Bytes of the header that starts `b`, or -1 when `b` is too short to tell."""
    if len(b) < 2:
        return -1
    ln = b[1] & 0x7F
    return 2 + (2 if ln == 126 else 8 if ln == 127 else 0) + (4 if b[1] & 0x80 else 0)
