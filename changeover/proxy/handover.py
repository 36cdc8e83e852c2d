"""Hand-over of the listen address to a successor process without a gap (SO_REUSEPORT).

With `reuse_port=True` the proxy's listening socket has SO_REUSEPORT, so a successor binds the
same address while this one still listens (it is given its slots before its `start()`: it takes
connections as soon as it listens). `retire()` then has the kernel send new connections to the
successor (a classic BPF program on the group, `steer_away`), closes this proxy's listener once
the handshakes already under way have completed (`RETIRE_LISTEN_SETTLE`; what is in its accept
queue is taken over, not reset) and lets every client connection end cleanly: responses carry
`Connection: close`, idle keep-alive connections get `RETIRE_IDLE_GRACE` to send one more
request, tunnels run until they close or the timeout. Clients reconnect, and only the successor
accepts them. `[proxy] workers` (proxy/workers.py) hands over to several successors at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

from changeover.proxy.client import ClientConn
from changeover.proxy.exchange import D_HEAD, D_IDLE, S_HEAD, WS_CUT_WAIT
from changeover.proxy.tls import TlsClientConn

if TYPE_CHECKING:
    from changeover.proxy.embedded import EmbeddedProxy

log = logging.getLogger("changeover.proxy")

# retire(): how long an idle keep-alive connection may still send one request (answered with
# Connection: close) before it is closed, and how often retire() looks at its connections
RETIRE_IDLE_GRACE = 1.0
RETIRE_TICK = 0.05
# how long a retiring listener that steered new connections to its successor still accepts, so
# that handshakes already under way complete here instead of being reset (about one client RTT)
RETIRE_LISTEN_SETTLE = 0.25
_SO_ATTACH_REUSEPORT_CBPF = 51      # linux/asm-generic/socket.h
_SO_DETACH_REUSEPORT_BPF = 68
_BPF_RET_K = 0x06                    # BPF_RET | BPF_K: return the constant k
_BPF_RET_A, _BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_ALU_ADD_K = 0x16, 0x20, 0x94, 0x04   # A = ..., return A
_SKF_AD_CPU = (-0x1000 + 36) & 0xFFFFFFFF   # SKF_AD_OFF + SKF_AD_CPU: the CPU number, an ancillary load



async def retire(proxy: EmbeddedProxy, timeout: float, first: int = 1, count: int = 1) -> int:
    """Hand the listen address over to a successor bound with SO_REUSEPORT (see the module
    docstring). New connections stop coming at once; returns when every client connection
    has ended, or at `timeout`, when what is left is closed (an unanswered request gets a
    504): the number of connections cut then. Slots keep working meanwhile; `close()` is
    still to be called."""
    if not proxy.running:
        return 0
    loop = proxy.loop
    proxy.retiring = True
    now = loop.time()
    deadline = now + timeout
    close_listener = now + RETIRE_LISTEN_SETTLE if steer_away(proxy, first, count) else now
    # (a TLS connection is a client once its handshake is done; until then `tls.handshaking`)
    while proxy.server is not None or proxy.clients or proxy.adopting or (proxy.tls and proxy.tls.handshaking):
        now = loop.time()
        if proxy.server is not None and now >= min(close_listener, deadline):
            stop_listening(proxy)
            continue
        if now >= deadline:
            break
        retire_idle(proxy, now)
        wake = deadline if proxy.server is None else min(deadline, close_listener)
        await asyncio.sleep(min(RETIRE_TICK, wake - now))
    else:
        close_idle_upstreams(proxy)
        return 0
    for task in list(proxy.adopting):
        task.cancel()
    cut = len(proxy.clients)
    for client in list(proxy.clients):
        try:
            client.retire_abort()
        except Exception:
            log.exception("closing a connection at the retire timeout failed")
            client.transport.abort()
    # WebSocket tunnels being closed wait for a frame in flight to end (exchange.WS_CUT_WAIT)
    end = loop.time() + WS_CUT_WAIT + RETIRE_TICK
    while any(c.cut_pending for c in proxy.clients) and loop.time() < end:
        await asyncio.sleep(RETIRE_TICK)
    proxy.clients.clear()
    close_idle_upstreams(proxy)
    if cut:
        log.warning("retire timed out after %.1fs; closed %d connection(s)", timeout, cut)
    return cut

def listeners(proxy: EmbeddedProxy) -> list[socket.socket]:
    """Duplicates of the listening sockets (the server's own are not ours to configure)."""
    out: list[socket.socket] = []
    for server in (proxy.server, proxy.tls.server if proxy.tls is not None else None):
        for s in server.sockets if server is not None else ():
            with contextlib.suppress(OSError):
                out.append(socket.socket(fileno=os.dup(s.fileno())))
    return out

def unsteer(proxy: EmbeddedProxy) -> None:
    """Remove the steering program a retired predecessor group left on the SO_REUSEPORT group
    (proxy/workers.py calls it once the predecessor's listeners are gone: a program picking
    socket k would otherwise keep sending every connection to one worker of a larger group)."""
    for ls in listeners(proxy):
        with contextlib.suppress(OSError):
            ls.setsockopt(socket.SOL_SOCKET, _SO_DETACH_REUSEPORT_BPF, 0)
        ls.close()

def steer_away(proxy: EmbeddedProxy, first: int = 1, count: int = 1) -> bool:
    """Ask the kernel to send new connections for the address to the successor: a one-
    instruction classic BPF program on the SO_REUSEPORT group that picks socket 1. A group
    holds its sockets in bind order, so while an old proxy hands over to one successor that
    is the successor (and with no successor the index is out of range: the kernel picks by
    hash as usual). Handshakes already under way then complete on this listener, which keeps
    accepting for RETIRE_LISTEN_SETTLE: closing it at once would reset them."""
    if not proxy.reuse_port or proxy.server is None or count < 1:
        return False
    # several successors ([proxy] workers, proxy/workers.py): sockets first..first+count-1,
    # picked by the CPU the handshake arrives on
    code = [(_BPF_RET_K, first)] if count == 1 else [
        (_BPF_LD_W_ABS, _SKF_AD_CPU), (_BPF_ALU_MOD_K, count), (_BPF_ALU_ADD_K, first), (_BPF_RET_A, 0)]
    insn = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", c, 0, 0, k) for c, k in code))
    prog = struct.pack("HP", len(code), ctypes.addressof(insn))       # struct sock_fprog
    steered = False
    for ls in listeners(proxy):
        try:
            ls.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, prog)
            steered = True
        except OSError as e:
            log.info("cannot steer new connections to the successor: %s", e)
        finally:
            ls.close()
    return steered

def stop_listening(proxy: EmbeddedProxy) -> None:
    """Close the listener without losing the connections already in its accept queue: the
    kernel resets those when a listening socket closes (unless net.ipv4.tcp_migrate_req moves
    them to the successor), so they are accepted here first, through a duplicate of the socket.
    The steering program stays on the group (removing it first would let the kernel pick this
    listener again until it is closed): the next proxy to bind the address removes it."""
    dups = listeners(proxy)
    tls_names = {s.getsockname() for s in proxy.tls.server.sockets} if proxy.tls and proxy.tls.server else set()
    server, proxy.server = proxy.server, None
    if server is None:
        return
    server.close()
    if proxy.tls is not None:
        proxy.tls.stop_listening()
    for ls in dups:
        tls = ls.getsockname() in tls_names
        ls.setblocking(False)
        try:
            while True:
                try:
                    conn, _ = ls.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    log.exception("accepting from the retired listener failed")
                    break
                conn.setblocking(False)
                task = proxy.loop.create_task(adopt(proxy, conn, tls))
                proxy.adopting.add(task)
                task.add_done_callback(proxy.adopting.discard)
        finally:
            ls.close()

async def adopt(proxy: EmbeddedProxy, conn: socket.socket, tls: bool = False) -> None:
    try:
        if tls and proxy.tls is not None:   # accepted from the HTTPS listener: the handshake is ours
            await proxy.loop.connect_accepted_socket(lambda: TlsClientConn(proxy), conn, ssl=proxy.tls.ssl)
            return
        await proxy.loop.connect_accepted_socket(lambda: ClientConn(proxy), conn)
    except BaseException:
        conn.close()
        raise

def retire_idle(proxy: EmbeddedProxy, now: float) -> None:
    """Idle keep-alive connections (and accepted ones that sent nothing yet) get the grace to
    send one more request; past it they are closed between requests, never mid-response."""
    proxy.now = max(proxy.now, now)
    grace = now + RETIRE_IDLE_GRACE
    for client in list(proxy.clients):
        if client.state == S_HEAD and not client.buf and (client.dkind == D_IDLE or client.dkind == D_HEAD):
            if client.deadline > grace:
                client.deadline = grace
            elif client.deadline <= now:
                client.timeout(now)

def close_idle_upstreams(proxy: EmbeddedProxy) -> None:
    for slot in proxy.slots.values():
        for up in slot.upstreams:
            up.close_idle()
