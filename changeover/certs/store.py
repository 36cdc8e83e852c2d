"""Certificate files under .changeover/certs/: 0600, written atomically, read for their dates."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

RENEW_FRACTION = 2 / 3          # renew once this much of a certificate's lifetime has passed


@dataclass(frozen=True)
class Validity:
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: int

    def renew_at(self, renew_before: float = 0.0) -> datetime.datetime:
        """When to renew: `renew_before` seconds before expiry, else at 2/3 of the lifetime."""
        if renew_before:
            return self.not_after - datetime.timedelta(seconds=renew_before)
        return self.not_before + (self.not_after - self.not_before) * RENEW_FRACTION


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (readers see the old file or the new one), mode 0600."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def validity(path: Path | str) -> Validity | None:
    """The dates of the first certificate in a PEM file; None when it is missing or unreadable."""
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERTIFICATE-----"):])
    except (OSError, ValueError):
        return None
    return Validity(cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)
