"""Plain summaries of certificates and bundles, for people and for JSON.

Used by ``cert inspect``, ``check`` and ``/-/status``. Only public data
appears here; a key is reduced to "present" and "matches the leaf".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from sidecar.credentials.identity import Bundle, ClientIdentity


@dataclass(frozen=True)
class CertSummary:
    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str
    days_left: int
    expired: bool
    not_yet_valid: bool
    sha256: str
    sans: tuple[str, ...]
    is_ca: bool
    self_signed: bool

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["sans"] = list(self.sans)
        return d


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> int:
    now = now or dt.datetime.now(dt.UTC)
    return int((cert.not_valid_after_utc - now).total_seconds() // 86400)


def summarize(cert: x509.Certificate, now: dt.datetime | None = None) -> CertSummary:
    now = now or dt.datetime.now(dt.UTC)
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(
            f"{type(n).__name__.removesuffix('Name').removesuffix('Address')}:{n.value}"
            for n in san_ext
        )
    except x509.ExtensionNotFound:
        sans = ()
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    return CertSummary(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:X}",
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        days_left=days_left(cert, now),
        expired=now >= cert.not_valid_after_utc,
        not_yet_valid=now < cert.not_valid_before_utc,
        sha256=fingerprint(cert),
        sans=sans,
        is_ca=is_ca,
        self_signed=cert.issuer == cert.subject,
    )


def bundle_report(bundle: Bundle, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything ``cert inspect --json`` shows."""
    now = now or dt.datetime.now(dt.UTC)
    leaf = summarize(bundle.leaf, now)
    return {
        "source": bundle.source,
        "certificates": [summarize(c, now).to_json() for c in bundle.chain],
        "not_in_chain": [summarize(c, now).to_json() for c in bundle.extra],
        "chain_length": len(bundle.chain),
        "key_present": bundle.key is not None,
        "key_matches_leaf": bundle.key_matches,
        "leaf_expired": leaf.expired,
        "leaf_not_yet_valid": leaf.not_yet_valid,
        "warnings": list(bundle.warnings),
    }


def identity_summary(identity: ClientIdentity, now: dt.datetime | None = None) -> dict[str, Any]:
    """What check and status say of a loaded identity."""
    leaf = summarize(identity.leaf, now)
    return {
        "subject": leaf.subject,
        "issuer": leaf.issuer,
        "not_after": leaf.not_after,
        "days_left": leaf.days_left,
        "sha256": leaf.sha256,
        "chain_length": len(identity.chain),
        "key_matches": True,
    }
