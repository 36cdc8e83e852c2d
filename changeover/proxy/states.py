"""The states of a client connection in the embedded proxy, shared by its modules (exchange.py,
client.py, tunnel.py, hold.py) without an import cycle between them."""

from __future__ import annotations

import time

# client states
S_HEAD, S_BODY, S_WAIT, S_TUNNEL, S_CLOSED = range(5)
# deadline kinds, checked by the sweeper (D_TUNNEL: idle timeout or drain limit of a tunnel;
# D_CUT: a WebSocket tunnel being closed waits for its frames to end)
D_NONE, D_HEAD, D_IDLE, D_BODY, D_RESPONSE, D_TUNNEL, D_CUT = range(7)
# reasons to pause reading from the client (bit mask)
P_PIPELINE, P_UPSTREAM, P_CONNECT, P_DELAY = 1, 2, 4, 8   # P_DELAY: a drill fault holds the request
P_HOLD = 16                        # a pause holds the request (proxy/hold.py)
# how long a WebSocket tunnel being cut waits for a frame still being relayed to end, so that the
# close frame goes in at a frame boundary; past it the tunnel is closed without one
WS_CUT_WAIT = 1.0
perf = time.perf_counter
