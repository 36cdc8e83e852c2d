"""Automatic TLS certificates over ACME for [proxy.tls] `acme = true`, run by the daemon.

`store` keeps what was issued (one 0600 PEM per host under `.changeover/certs/`: key and chain in
one file, replaced atomically, so the proxy never reads a key that does not match its
certificate); `issuer` speaks ACME through the `acme` library (HTTP-01: the token goes in
`.changeover/acme-challenges/`, which the proxy's HTTP listener answers from); `manager` decides
when to issue and renew, retries with backoff and alerts through [notify]. The proxy worker
picks a new file up by itself (proxy/tls.py): nothing is restarted.
"""
