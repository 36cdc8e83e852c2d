"""When certificates are issued and renewed, and what happens when the CA says no.

For every host of [proxy.tls] `hosts`: issued at once when there is no certificate (the proxy
serves a temporary self-signed one meanwhile), renewed at 2/3 of its lifetime (or
`acme_renew_before` before expiry). A failure keeps the last good certificate (nothing is written),
is recorded in the history, alerts through [notify] (`certificate_failed`) and is retried with
exponential backoff from RETRY_BASE up to RETRY_MAX, never sooner than the CA's Retry-After: a CA
that limits its rate is not hammered.

The same loop watches certificate files the user manages ([proxy.tls] cert/key and
[[proxy.tls.certificates]]): a change that does not load is alerted, like an ACME failure (the
proxy refuses it by itself and keeps serving the previous certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from changeover.certs.issuer import IssueError, Issuer
from changeover.certs.store import validity, write_private
from changeover.proxy.tls_settings import AcmeSettings, TlsSettings

log = logging.getLogger("changeover.certs")
RETRY_BASE = 60.0               # first retry after a failed order, doubled each time
RETRY_MAX = 6 * 3600.0
CHECK_INTERVAL = 3600.0         # how often renewal dates are looked at again
WATCH_INTERVAL = 2.0            # how often user-managed certificate files are looked at
MIN_RECHECK = 10.0              # after an issue, never look at the same host sooner than this

Notify = Callable[[str, dict[str, Any]], Awaitable[None]]
Record = Callable[..., None]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertManager:
    def __init__(self, tls: TlsSettings, acme: AcmeSettings | None, notify: Notify, record: Record,
                 clock: Callable[[], datetime.datetime] = _utcnow) -> None:
        self.tls = tls
        self.acme = acme
        self.notify = notify
        self.record = record              # state.event(kind, **fields): the history
        self.clock = clock
        self.issuer = Issuer(acme) if acme is not None else None
        self.next_try: dict[str, datetime.datetime] = {}
        self.failures: dict[str, int] = {}
        self.last_error: dict[str, str] = {}
        managed = set(tls.managed)
        self._files = [(c, k) for c, k in tls.certificates if c not in managed]
        self._stamps: dict[str, tuple[Any, ...] | None] = {c: self._stamp(c, k) for c, k in self._files}
        self._tasks: list[asyncio.Task[None]] = []
        self.wake = asyncio.Event()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.acme is not None:
            self._tasks.append(loop.create_task(self._acme_loop(), name="acme"))
        if self._files:
            self._tasks.append(loop.create_task(self._watch_files(), name="cert-files"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for host in self.acme.hosts if self.acme else ():
            v = validity(self.acme.cert_path(host)) if self.acme else None
            nxt = self.next_try.get(host)
            out[host] = {"expires": v.not_after.isoformat() if v else None,
                         "next_check": nxt.isoformat() if nxt else None,
                         "error": self.last_error.get(host)}
        return out

    # -- ACME ------------------------------------------------------------------------------------
    async def _acme_loop(self) -> None:
        assert self.acme is not None
        while True:
            now = self.clock()
            for host in self.acme.hosts:
                if now >= self.next_try.get(host, now):
                    try:
                        await self.ensure(host)
                    except Exception:          # a bug or a full disk: this host later, never the loop
                        log.exception("the certificate of %s could not be renewed", host)
                        self.next_try[host] = self.clock() + datetime.timedelta(seconds=RETRY_BASE)
            soonest = min(self.next_try.values(), default=now + datetime.timedelta(seconds=CHECK_INTERVAL))
            wait = max(0.05, min(CHECK_INTERVAL, (soonest - self.clock()).total_seconds()))
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.wake.wait()

    async def ensure(self, host: str) -> bool:
        """Issue or renew `host`'s certificate if it is due; False when the CA failed us."""
        assert self.acme is not None and self.issuer is not None
        path = Path(self.acme.cert_path(host))
        current = validity(path)
        now = self.clock()
        if current is not None and now < current.renew_at(self.acme.renew_before):
            self.next_try[host] = min(current.renew_at(self.acme.renew_before),
                                      now + datetime.timedelta(seconds=CHECK_INTERVAL))
            return True
        kind = "renew" if current is not None else "issue"
        try:
            pem = await asyncio.to_thread(self.issuer.issue, host)
        except IssueError as e:
            n = self.failures[host] = self.failures.get(host, 0) + 1
            delay = max(min(RETRY_MAX, RETRY_BASE * 2 ** (n - 1)), e.retry_after or 0.0)
            self.next_try[host] = now + datetime.timedelta(seconds=delay)
            self.last_error[host] = str(e)
            serving = (f"the previous certificate (valid until {current.not_after:%Y-%m-%d %H:%M} UTC)"
                       if current is not None and current.not_after > now
                       else "a temporary self-signed certificate")
            log.error("could not %s the certificate for %s (attempt %d, next in %.0fs): %s; serving %s",
                      kind, host, n, delay, e, serving)
            self.record("certificate.failed", host=host, error=str(e), attempt=n, retry_in=delay)
            await self.notify("certificate_failed", {"host": host, "reason": str(e), "attempt": n,
                                                     "retry_in": delay, "serving": serving})
            return False
        write_private(path, pem)
        new = validity(path)
        self.failures.pop(host, None)
        self.last_error.pop(host, None)
        renew = new.renew_at(self.acme.renew_before) if new else now
        if new is not None and renew <= now:
            log.warning("acme_renew_before (%.0fs) is longer than the certificates %s issues (valid %s): "
                        "%s is renewed every %.0fs (until the CA's rate limit stops it)", self.acme.renew_before,
                        self.acme.directory, new.not_after - new.not_before, host, MIN_RECHECK)
        self.next_try[host] = max(min(renew, now + datetime.timedelta(seconds=CHECK_INTERVAL)),
                                  now + datetime.timedelta(seconds=MIN_RECHECK))
        expires = new.not_after.isoformat() if new else None
        log.info("certificate for %s %s, valid until %s", host, "renewed" if kind == "renew" else "issued", expires)
        self.record("certificate.issued", host=host, renewal=kind == "renew", expires=expires)
        await self.notify("certificate_issued", {"host": host, "renewal": kind == "renew", "expires": expires})
        return True

    # -- certificates the user manages ----------------------------------------------------------
    @staticmethod
    def _stamp(cert: str, key: str) -> tuple[Any, ...] | None:
        try:
            return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (os.stat(p) for p in (cert, key) if p))
        except OSError:
            return None

    async def _watch_files(self) -> None:
        from changeover.proxy.tls import server_context

        pending: dict[str, int] = {}      # changed files that did not load, and for how many looks
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for cert, key in self._files:
                stamp = self._stamp(cert, key)
                if stamp == self._stamps.get(cert) and cert not in pending:
                    continue
                self._stamps[cert] = stamp
                try:
                    server_context(cert, key, self.tls.min_version)
                except (OSError, ssl.SSLError, ValueError) as e:
                    pending[cert] = pending.get(cert, 0) + 1
                    if pending[cert] == 2:   # twice in a row: not a file caught half written
                        reason = f"{cert}: cannot load the certificate and key: {e}"
                        log.error("%s; the proxy keeps serving the previous certificate", reason)
                        self.record("certificate.failed", host=cert, error=reason)
                        await self.notify("certificate_failed", {"host": cert, "reason": reason,
                                                                 "serving": "the previous certificate"})
                    continue
                if pending.pop(cert, None) is not None:
                    log.info("%s loads again", cert)
