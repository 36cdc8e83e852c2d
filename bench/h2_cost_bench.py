"""What HTTP/2 with the `h2` library would cost per request, server side only: the frames a client
sends are made outside the timed part; parsing them, the events, and encoding a small response
(HEADERS + DATA) are timed. Compare with the whole HTTP/1.1 proxy path per request (CPU
µs/request in docs/benchmarks.md). `h2` is not a dependency of changeover:

    .venv/bin/pip install --target /tmp/h2lib h2
    H2_PATH=/tmp/h2lib .venv/bin/python bench/h2_cost_bench.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.environ.get("H2_PATH", ""))

import h2
import h2.config
import h2.connection
import h2.events

REQUESTS = 20000
BATCH = 50                      # streams open at once (under h2's default of 100)
HEADERS = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "shop.test"),
           ("user-agent", "bench")]
RESPONSE = [(":status", "200"), ("content-length", "4"), ("content-type", "text/plain")]


def main() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.data_to_send()
    timed = 0.0
    for _ in range(REQUESTS // BATCH):
        frames = []
        for _ in range(BATCH):
            client.send_headers(client.get_next_available_stream_id(), HEADERS, end_stream=True)
            frames.append(client.data_to_send())
        t0 = time.perf_counter()
        out = []
        for data in frames:
            for ev in server.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    server.send_headers(ev.stream_id, RESPONSE)
                    server.send_data(ev.stream_id, b"blue", end_stream=True)
            out.append(server.data_to_send())
        timed += time.perf_counter() - t0
        for data in out:              # the client reads the answers and opens the windows again
            for ev in client.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        server.receive_data(client.data_to_send())
        server.data_to_send()
    print(f"h2 {h2.__version__}, server side only: {timed / REQUESTS * 1e6:.1f} µs per request")


if __name__ == "__main__":
    main()
