"""One ACME order for one host name, through the `acme` library (blocking: run in a thread).

The account key (EC P-256) is kept in `.changeover/certs/account.key` so renewals use the same
account; the certificate key is new for every order. HTTP-01 only: the proxy answers
/.well-known/acme-challenge/<token> on the HTTP listener from the file written here.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import logging
from pathlib import Path
from typing import Any

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from changeover.certs.store import private_dir, write_private
from changeover.proxy.tls_settings import AcmeSettings

log = logging.getLogger("changeover.certs")
ORDER_TIMEOUT = 90.0            # seconds for the CA to validate and issue once the challenge is answered
NETWORK_TIMEOUT = 30


class IssueError(Exception):
    """The CA did not issue: why, and how long it asked us to wait (Retry-After), if it did."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Network(client.ClientNetwork):
    """Remembers the last Retry-After the CA sent: the library drops it from its errors."""

    retry_after: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.retry_after = response.headers.get("Retry-After")
        return response


def _seconds(retry_after: str | None) -> float | None:
    if not retry_after:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Issuer:
    def __init__(self, settings: AcmeSettings) -> None:
        self.settings = settings
        self._client: client.ClientV2 | None = None
        self._net: _Network | None = None

    def _account_key(self) -> JWKEC:
        path = Path(self.settings.certs_dir) / "account.key"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(path, _pem(key))
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IssueError(f"{path} is not an EC private key")
        return JWKEC(key=key)

    def _connect(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        s = self.settings
        net = _Network(self._account_key(), alg=ES256, user_agent="changeover", timeout=NETWORK_TIMEOUT,
                       verify_ssl=s.ca_bundle or True)   # type: ignore[arg-type]   # requests takes a CA file too
        self._net = net                        # its Retry-After is read when an error comes
        directory = client.ClientV2.get_directory(s.directory, net)
        acme = client.ClientV2(directory, net=net)
        registration = messages.NewRegistration.from_data(email=s.email or None, terms_of_service_agreed=True)
        try:
            net.account = acme.new_account(registration)
        except errors.ConflictError as e:      # the key already has an account: use it
            net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
        self._client = acme
        return acme

    def issue(self, host: str) -> bytes:
        """A new certificate for `host`: its key then the full chain, PEM. Raises IssueError."""
        try:
            return self._issue(host)
        except IssueError:
            raise
        except messages.Error as e:
            self._client = None                # a fresh nonce and account lookup next time
            retry = _seconds(self._net.retry_after) if self._net is not None else None
            raise IssueError(f"the CA refused: {e.code or e.typ}: {e.detail or e}", retry) from None
        except errors.ValidationError as e:
            details = "; ".join(str(c.error.detail if c.error else c.chall.typ) for a in e.failed_authzrs
                                for c in a.body.challenges if c.error is not None) or str(e)
            raise IssueError(f"the CA could not validate {host} over HTTP-01: {details}") from None
        except (errors.TimeoutError, errors.PollError) as e:
            raise IssueError(f"the CA did not finish the order in {ORDER_TIMEOUT:.0f}s: {e}") from None
        except (requests.RequestException, errors.ClientError, errors.Error, OSError) as e:
            self._client = None
            raise IssueError(f"cannot talk to the ACME server {self.settings.directory}: {e}") from None

    def _issue(self, host: str) -> bytes:
        acme = self._connect()
        key_pem = _pem(ec.generate_private_key(ec.SECP256R1()))
        order = acme.new_order(crypto_util.make_csr(key_pem, [host]))
        tokens: list[Path] = []
        challenge_dir = private_dir(Path(self.settings.challenge_dir))
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue                   # validated recently: the CA reuses it
                chall = next((c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None)
                if chall is None:
                    raise IssueError(f"the CA offers no HTTP-01 challenge for {host}")
                response, validation = chall.response_and_validation(acme.net.key)
                token = challenge_dir / chall.chall.encode("token")
                write_private(token, validation.encode())
                tokens.append(token)
                acme.answer_challenge(chall, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            done = acme.poll_and_finalize(order, deadline)
        finally:
            for token in tokens:
                with contextlib.suppress(OSError):
                    token.unlink()
        log.info("certificate issued for %s", host)
        return key_pem + done.fullchain_pem.encode()
