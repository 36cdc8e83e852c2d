"""A small asyncio client for etcd's v3 JSON gateway (the `/v3/...` HTTP API every etcd serves on
its client URLs), over httpx.

Only what the fleet needs: range (linearizable, or serializable to read from a member that lost
its quorum), put, delete, compare-and-set transactions, leases (grant, keep-alive, revoke) and a
watch (a streaming POST whose newline-separated JSON messages carry the events). Keys and values
are base64 on the wire and int64 numbers come as strings: both are hidden here.

Several endpoints: a request goes to the one that answered last and moves on to the next when it
cannot connect, times out or is told there is no leader, so losing one member of three is
invisible. When no member can serve a request, `EtcdUnavailable` says which were tried and why.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from changeover.errors import ChangeoverError

REQUEST_TIMEOUT = 2.0     # a write without quorum hangs in etcd; give up on it quickly


class EtcdError(ChangeoverError):
    """etcd refused a request (auth, a bad request): not worth trying another member."""


class EtcdUnavailable(ChangeoverError):
    """No etcd member could serve the request (unreachable, or no quorum)."""


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int

    def json(self) -> Any:
        return json.loads(self.value) if self.value else None


@dataclass(frozen=True)
class Event:
    type: str          # PUT | DELETE
    kv: KV


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with `prefix` (etcd's convention)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b).decode()


def _kv(d: dict[str, Any]) -> KV:
    return KV(_unb64(d.get("key")).decode(), _unb64(d.get("value")), int(d.get("mod_revision", 0)),
              int(d.get("create_revision", 0)), int(d.get("lease", 0)))


class Etcd:
    def __init__(self, endpoints: list[str] | tuple[str, ...], *, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, user: str | None = None,
                 password: str | None = None, timeout: float = REQUEST_TIMEOUT) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._user, self._password = user, password
        self._token: str | None = None
        verify: ssl.SSLContext | bool = True
        if ca_file or cert_file:
            verify = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                verify.load_cert_chain(cert_file, key_file)
        self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(timeout, connect=min(1.0, timeout)),
                                         limits=httpx.Limits(max_keepalive_connections=4))

    async def close(self) -> None:
        await self._client.aclose()

    # -- transport ------------------------------------------------------------------------------
    def _order(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    async def _auth(self, endpoint: str) -> dict[str, str]:
        if self._user is None:
            return {}
        if self._token is None:
            r = await self._client.post(f"{endpoint}/v3/auth/authenticate",
                                        json={"name": self._user, "password": self._password or ""})
            if r.status_code != 200:
                raise EtcdError(f"etcd authentication as {self._user!r} failed: {_message(r)}")
            self._token = str(r.json().get("token", ""))
        return {"Authorization": self._token}

    async def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """POST to the first member that serves it; raise EtcdUnavailable when none does."""
        problems = []
        for i, endpoint in enumerate(self._order()):
            try:
                headers = await self._auth(endpoint)
                r = await self._client.post(f"{endpoint}{path}", json=body, headers=headers,
                                            timeout=timeout or self.timeout)
            except (httpx.TransportError, OSError) as e:
                problems.append(f"{endpoint}: {type(e).__name__}{': ' + str(e) if str(e) else ''}")
                continue
            if r.status_code == 200:
                self._current = (self._current + i) % len(self.endpoints)
                return dict(r.json())
            msg = _message(r)
            if r.status_code == 401 or ("token" in msg and self._user is not None):
                self._token = None
            if r.status_code >= 500 or "leader" in msg or "timed out" in msg or "unavailable" in msg:
                problems.append(f"{endpoint}: {msg}")
                continue
            raise EtcdError(f"etcd refused {path}: {msg}")
        raise EtcdUnavailable("no etcd member could answer (" + "; ".join(problems) + ")")

    # -- key-value --------------------------------------------------------------------------------
    async def get(self, key: str, *, serializable: bool = False) -> tuple[KV | None, int]:
        """The key (or None) and the store's revision."""
        out = await self.call("/v3/kv/range", {"key": _b64(key), "serializable": serializable})
        kvs = [_kv(d) for d in out.get("kvs", [])]
        return (kvs[0] if kvs else None), int(out.get("header", {}).get("revision", 0))

    async def get_prefix(self, prefix: str, *, serializable: bool = False) -> tuple[list[KV], int]:
        out = await self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                               "serializable": serializable})
        return [_kv(d) for d in out.get("kvs", [])], int(out.get("header", {}).get("revision", 0))

    async def put(self, key: str, value: Any, lease: int = 0) -> int:
        """Write `value` (JSON-encoded unless bytes); the new revision."""
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(data)}
        if lease:
            body["lease"] = str(lease)
        out = await self.call("/v3/kv/put", body)
        return int(out.get("header", {}).get("revision", 0))

    async def delete(self, key: str, *, prefix: bool = False) -> None:
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        await self.call("/v3/kv/deleterange", body)

    async def put_if(self, key: str, value: Any, *, mod_revision: int | None = None, absent: bool = False,
                     lease: int = 0) -> tuple[bool, KV | None, int]:
        """Compare-and-set: write only if the key is absent (absent=True) or still at `mod_revision`.
        Returns (written, the key as it is when not written, revision)."""
        if absent:
            cmp = {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            cmp = {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision or 0)}
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(data)}
        if lease:
            put["lease"] = str(lease)
        out = await self.call("/v3/kv/txn", {"compare": [cmp], "success": [{"request_put": put}],
                                             "failure": [{"request_range": {"key": _b64(key)}}]})
        rev = int(out.get("header", {}).get("revision", 0))
        if out.get("succeeded"):
            return True, None, rev
        for r in out.get("responses", []):
            kvs = r.get("response_range", {}).get("kvs", [])
            if kvs:
                return False, _kv(kvs[0]), rev
        return False, None, rev

    # -- leases -----------------------------------------------------------------------------------
    async def grant(self, ttl: float) -> int:
        out = await self.call("/v3/lease/grant", {"TTL": str(max(1, round(ttl)))})
        if out.get("error"):
            raise EtcdError(f"lease grant: {out['error']}")
        return int(out["ID"])

    async def keepalive(self, lease: int) -> bool:
        """Refresh the lease once; False when it has expired (its keys are gone)."""
        out = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(out.get("result", {}).get("TTL", 0)) > 0

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    # -- watch ------------------------------------------------------------------------------------
    async def watch(self, key: str, *, prefix: bool = False, start_revision: int = 0) -> AsyncIterator[Event]:
        """Events on the key (or prefix) from `start_revision`, until the stream breaks: then
        EtcdUnavailable, and the caller resumes from the last revision it saw, on any member."""
        req: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            req["range_end"] = _b64(prefix_end(key))
        if start_revision:
            req["start_revision"] = str(start_revision)
        problems = []
        for endpoint in self._order():
            opened = False
            try:
                headers = await self._auth(endpoint)
                async with self._client.stream("POST", f"{endpoint}/v3/watch", json={"create_request": req},
                                               headers=headers, timeout=httpx.Timeout(self.timeout, read=None)
                                               ) as r:
                    if r.status_code != 200:
                        problems.append(f"{endpoint}: HTTP {r.status_code}")
                        continue
                    opened = True   # from here on a break is the caller's to resume (no events twice)
                    async for line in r.aiter_lines():
                        if not line.strip():
                            continue
                        msg = json.loads(line)
                        if "error" in msg:
                            raise EtcdUnavailable(f"watch on {endpoint}: {msg['error'].get('message')}")
                        res = msg.get("result", {})
                        if res.get("compact_revision") and res.get("canceled"):
                            raise EtcdUnavailable(f"watch from revision {start_revision}: compacted")
                        for ev in res.get("events", []):
                            yield Event(str(ev.get("type", "PUT")), _kv(ev.get("kv", {})))
                    problems.append(f"{endpoint}: the watch stream ended")
                    break
            except (httpx.TransportError, OSError, ValueError) as e:
                problems.append(f"{endpoint}: {type(e).__name__}")
                if opened:
                    break
        raise EtcdUnavailable("watch: " + "; ".join(problems))

    async def members(self) -> list[dict[str, Any]]:
        out = await self.call("/v3/cluster/member/list", {})
        return list(out.get("members", []))


def _message(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return f"HTTP {r.status_code} {r.text[:200]}"
    return str(data.get("message") or data.get("error") or data)[:300]
