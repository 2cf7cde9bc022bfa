"""The interception certificate: made, kept, renewed; it vouches for the upstream only.

What it is, and why (issue 15). A client that trusts a proxy's certificate
trusts it for whatever that certificate can vouch for. mitmproxy's CA can sign
for any site, so a stolen one impersonates the whole web. Ours is a
*self-signed certificate that is not a CA* (``BasicConstraints CA:false``,
key usage ``digitalSignature`` only, extended key usage ``serverAuth``), whose
subject alternative names are exactly the route's upstream names
(`sidecar.intercept.names`). Trusted, it vouches for those names and nothing
else: a client checking another name against it fails, and a certificate it
"signs" fails as having no CA issuer. OpenSSL (Python, curl), Node.js and
Java all accept such a certificate as its own trust anchor
(tests/intercept/test_certificate.py proves each claim with real clients);
a name-constrained CA would also work, but a dNSName constraint permits every
subdomain too, and not every client enforces constraints.

Where it lives: ``intercept.cert_dir`` (default `default_cert_dir`), as
``ROUTE.pem`` (the certificate) and ``ROUTE.key`` (its key, mode 0600, never
logged or served), each written atomically, reused across restarts so a
client trusts it once. ECDSA P-256, valid 397 days.

Its lifecycle (`InterceptCertificates.current`):

- none there (or unreadable, or its key does not match) → made now;
- the route's names changed → made anew (a warning: clients must trust it again);
- within `RENEW_BEFORE` of its expiry → its successor is made beside it
  (``ROUTE.next.pem``/``.key``) and published with it, while the old one is
  still served until it expires; a warning tells users to trust the new one
  now, so nothing breaks at the switch;
- expired → the successor (if valid) takes its place, else a new one is made;
- the folder is not writable and holds no valid certificate → `ConfigError`
  naming the folder and the fix (read-only containers mount one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import ssl
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.config import RouteConfig, UpstreamURL
from sidecar.errors import ConfigError
from sidecar.intercept.names import UpstreamName, host_names, upstream_names

log = logging.getLogger("sidecar.intercept")

VALIDITY = dt.timedelta(days=397)  # the CA/Browser Forum's ceiling for TLS server certificates
RENEW_BEFORE = dt.timedelta(days=30)
BACKDATE = dt.timedelta(hours=1)  # a client whose clock is a little behind still accepts it
ALPN = ("http/1.1",)


def default_cert_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/mtls-sidecar``, else ``~/.local/state/mtls-sidecar``."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative value is invalid and must be ignored.
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "mtls-sidecar"


@dataclass(frozen=True)
class InterceptCertificate:
    """One certificate on disk, read and checked; the key stays in its file."""

    cert: x509.Certificate
    cert_path: Path
    key_path: Path

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256, colon-separated upper-case hex (as browsers and keytool show it)."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    @property
    def names(self) -> tuple[str, ...]:
        return _san_names(self.cert)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


def _san_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*san.get_values_for_type(x509.DNSName), *ips)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class InterceptCertificates:
    """The interception certificate of one route: ``current()`` to serve, ``published()`` to trust.

    ``where`` is the route's key path in error messages (``routes[0]``); logs name ``route``.
    """

    def __init__(
        self,
        directory: Path,
        route: str,
        names: tuple[UpstreamName, ...],
        *,
        where: str = "route",
        now: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.directory = directory
        self.route = route
        self.hosts = host_names(names)
        self.where = where
        self._now = now
        self._current: InterceptCertificate | None = None
        self._next: InterceptCertificate | None = None
        self._context: tuple[str, ssl.SSLContext] | None = None
        self._warned: set[str] = set()
        self._server_names: weakref.WeakKeyDictionary[ssl.SSLObject, str] = (
            weakref.WeakKeyDictionary()
        )

    # ----------------------------------------------------------------- public

    def current(self) -> InterceptCertificate:
        """The certificate to serve now: read, made, renewed or replaced as needed."""
        now = self._now()
        if self._current is None or not self._serves(self._current, now):
            self._current = self._settle(now)
        if now >= self._current.not_after - RENEW_BEFORE:
            self._prepare_successor(now)
        return self._current

    def published(self) -> tuple[InterceptCertificate, ...]:
        """What clients should trust: the current certificate, and its successor near expiry."""
        current = self.current()
        return (current, self._next) if self._next is not None else (current,)

    def pem(self) -> bytes:
        return b"".join(c.pem for c in self.published())

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context presenting the current certificate, ALPN http/1.1 only."""
        current = self.current()
        if self._context is None or self._context[0] != current.fingerprint:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(current.cert_path, current.key_path)
            ctx.set_alpn_protocols(list(ALPN))
            ctx.sni_callback = self._note_server_name
            self._context = (current.fingerprint, ctx)
        return self._context[1]

    def _note_server_name(
        self, conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        # Noted, not refused here: a handshake failed in this callback ends in a reset
        # instead of an alert, whereas a verifying client refuses our certificate for
        # another name with a clear message, and `foreign_server_name` closes the rest.
        if name is not None:
            self._server_names[conn] = name.lower()

    def foreign_server_name(self, conn: object) -> str | None:
        """The name (SNI) a TLS connection asked for when the certificate does not name it."""
        name = self._server_names.get(conn) if isinstance(conn, ssl.SSLObject) else None
        return name if name is not None and name not in self.hosts else None

    # ---------------------------------------------------------------- lifecycle

    def _path(self, suffix: str, *, successor: bool = False) -> Path:
        return self.directory / f"{self.route}{'.next' if successor else ''}.{suffix}"

    def _serves(self, cert: InterceptCertificate, now: dt.datetime) -> bool:
        """Valid now, and for exactly this route's names."""
        c = cert.cert
        return c.not_valid_before_utc <= now < c.not_valid_after_utc and set(cert.names) == set(
            self.hosts
        )

    def _settle(self, now: dt.datetime) -> InterceptCertificate:
        """The certificate to serve when the one in memory (if any) no longer serves."""
        current = self._read(successor=False)
        if current is not None and self._serves(current, now):
            return current
        successor = self._read(successor=True)
        if successor is not None and self._serves(successor, now):
            self._next = None
            return self._promote(successor)
        if current is not None and set(current.names) != set(self.hosts):
            why = (
                f"the route's upstream names changed (it named {', '.join(current.names)}): "
                "a new one was made for " + ", ".join(self.hosts)
            )
        elif current is not None:
            why = f"it expired on {current.not_after.date()}: a new one was made"
        else:
            why = None
        made = self._make(now, successor=False)
        if why is not None:
            log.warning(
                "route %s: the interception certificate in %s is not used: %s; clients must "
                "trust the new one (SHA-256 %s): `mtls-sidecar trust show`",
                self.route, self.directory, why, made.fingerprint,
            )  # fmt: skip
        else:
            log.info(
                "route %s: made the interception certificate for %s in %s (SHA-256 %s); "
                "trust it with `mtls-sidecar trust show`",
                self.route, ", ".join(self.hosts), self.directory, made.fingerprint,
            )  # fmt: skip
        return made

    def _prepare_successor(self, now: dt.datetime) -> None:
        assert self._current is not None
        if self._next is None or not self._good_successor(self._next, now):
            found = self._read(successor=True)
            if found is not None and self._good_successor(found, now):
                self._next = found
            else:
                try:
                    self._next = self._make(now, successor=True)
                except ConfigError as exc:
                    self._warn_once(
                        f"unwritable:{self._current.fingerprint}",
                        f"route {self.route}: the interception certificate expires on "
                        f"{self._current.not_after.date()} and no successor can be made: {exc}",
                    )
                    return
        self._warn_once(
            self._next.fingerprint,
            f"route {self.route}: the interception certificate expires on "
            f"{self._current.not_after.date()}; its successor (SHA-256 {self._next.fingerprint}) "
            "takes over then: trust it now, or clients stop working at the switch "
            "(`mtls-sidecar trust show` prints both and how to trust them)",
        )

    def _good_successor(self, cert: InterceptCertificate, now: dt.datetime) -> bool:
        assert self._current is not None
        return (
            set(cert.names) == set(self.hosts)
            and cert.not_after > self._current.not_after
            and cert.cert.not_valid_before_utc <= now
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _promote(self, successor: InterceptCertificate) -> InterceptCertificate:
        """The successor becomes ``ROUTE.pem``/``ROUTE.key`` (or is served where it is)."""
        cert_path, key_path = self._path("pem"), self._path("key")
        try:
            os.replace(successor.key_path, key_path)
            os.replace(successor.cert_path, cert_path)
        except OSError:
            return successor  # a read-only folder: serve it from where it is
        log.info("route %s: the interception certificate's successor (SHA-256 %s) is served now",
                 self.route, successor.fingerprint)  # fmt: skip
        return InterceptCertificate(successor.cert, cert_path, key_path)

    def _read(self, *, successor: bool) -> InterceptCertificate | None:
        """The certificate and key files if both are there, readable and belong together."""
        cert_path = self._path("pem", successor=successor)
        key_path = self._path("key", successor=successor)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, TypeError) as exc:
            # The reason only: a parse error could quote the file's bytes.
            log.warning("route %s: ignoring the interception certificate %s: unreadable (%s)",
                        self.route, cert_path, type(exc).__name__)  # fmt: skip
            return None
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            log.warning("route %s: ignoring the interception certificate %s: %s is not its key",
                        self.route, cert_path, key_path)  # fmt: skip
            return None
        return InterceptCertificate(cert, cert_path, key_path)

    def _make(self, now: dt.datetime, *, successor: bool) -> InterceptCertificate:
        cert_path = self._path("pem", successor=successor)
        key_path = self._path("key", successor=successor)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_certificate(key, self.hosts, now)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The key first: a certificate on disk always has its key beside it.
            _write_atomically(key_path, key_pem, 0o600)
            _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise ConfigError(
                f"{self.where}.intercept.cert_dir: cannot write the interception certificate "
                f"to {self.directory} ({exc.strerror or exc}), and no valid one is there",
                hint=f"make {self.directory} writable, set intercept.cert_dir to a writable "
                f"folder, or mount one holding {cert_path.name} and {key_path.name} made by "
                "`mtls-sidecar trust show -c FILE` elsewhere",
            ) from None
        return InterceptCertificate(cert, cert_path, key_path)


def build_certificate(
    key: ec.EllipticCurvePrivateKey, hosts: tuple[str, ...], now: dt.datetime
) -> x509.Certificate:
    """Self-signed, not a CA, serverAuth only, for exactly ``hosts`` (DNS names or IPs)."""
    first = hosts[0] if hosts else "upstream"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-sidecar interception (not a CA)"),
            x509.NameAttribute(NameOID.COMMON_NAME, first[:64]),
        ]
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now - BACKDATE + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """A temporary file in the same folder, created with ``mode``, then renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: One `InterceptCertificates` per folder, route and names in this process, so that the
#: listener, ``/-/intercept.pem`` and ``trust show`` see (and renew) the same certificate.
_SHARED: dict[tuple[Path, str, tuple[UpstreamName, ...]], InterceptCertificates] = {}


def route_certificates(
    route: RouteConfig,
    index: int | None,
    upstream: UpstreamURL | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> InterceptCertificates:
    """The interception certificates of ``route`` (``upstream``: one a destination supplied).

    Names that change (a destination's new URL) give another certificate.
    """
    upstream = upstream or route.upstream
    where = f"routes[{index}]" if index is not None else f"route {route.name}"
    if upstream is None:
        raise ConfigError(
            f"{where}.upstream: the interception certificate names the upstream, and it is "
            "not known before the destination is fetched",
            hint="give routes[].upstream too, or fetch the certificate from the running "
            "sidecar: curl http://127.0.0.1:8080/-/intercept.pem",
        )
    directory = route.intercept.cert_dir or default_cert_dir(env)
    names = upstream_names(upstream, route.rewrite_hosts)
    key = (directory, route.name, names)
    if key not in _SHARED:
        _SHARED[key] = InterceptCertificates(directory, route.name, names, where=where)
    return _SHARED[key]
