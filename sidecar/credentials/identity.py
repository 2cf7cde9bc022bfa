"""Client identities: reading certificate bundles and handing them to OpenSSL.

This is the only module that touches private keys. It reads every bundle
format SAP BTP and common tools produce, checks it, and builds the client
`ssl.SSLContext` without the key ever reaching a file system:

    bytes ──read_bundle_bytes()──▶ Bundle (certs leaf-first, key?, warnings)
                                     │ .identity(now)   (key present and matching,
                                     ▼                   leaf currently valid)
                                ClientIdentity ──client_ssl_context()──▶ SSLContext
                                                  (via memfd_create)

Formats: PEM with key and certificates in any order; PEM that is itself
base64-encoded; encrypted keys (PKCS#8 and legacy ``Proc-Type: 4,ENCRYPTED``);
a separate key file; PKCS#12; a single DER certificate (no key). JKS is
recognised and refused with a conversion hint.

It stays one module (~580 lines) on purpose: it is the only code that touches
private keys, and keeping every such line in one file is what makes that checkable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import os
import re
import ssl
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.credentials.tls_sessions import ResumingContext
from sidecar.errors import CredentialError, PasswordError

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"}
_KEY_LABELS = {b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY",
               b"DSA PRIVATE KEY"}  # fmt: skip
_JKS_MAGIC = {b"\xfe\xed\xfe\xed": "JKS", b"\xce\xce\xce\xce": "JCEKS"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------- passwords


def read_password(
    *,
    password_env: str | None = None,
    password_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    env_label: str = "credentials.password_env",
    file_label: str = "credentials.password_file",
) -> bytes | None:
    """The key password from an environment variable or a file, never from argv.

    The labels name where the variable or file was configured, for messages.
    """
    env = os.environ if env is None else env
    if password_env:
        if password_env not in env:
            raise PasswordError(
                f"{env_label}: environment variable {password_env} is not set",
                hint=f"export {password_env}=... (the key password) and try again",
            )
        return env[password_env].encode()
    if password_file:
        try:
            data = password_file.read_bytes()
        except FileNotFoundError:
            raise PasswordError(
                f"{password_file}: password file not found",
                hint=f"create it with the key password, or fix {file_label}",
            ) from None
        except OSError as exc:
            raise PasswordError(
                f"{password_file}: cannot read password file: {exc.strerror or exc}",
                hint=f"{file_label} must be a file readable by the sidecar's user",
            ) from None
        # Files written by editors and `echo` end with a newline that is not part of it.
        return data.removesuffix(b"\n").removesuffix(b"\r")
    return None


# ------------------------------------------------------------------------ bundles


@dataclass(frozen=True)
class Bundle:
    """What a bundle holds: certificates (chain leaf-first) and maybe a key."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey | None
    source: str
    extra: tuple[x509.Certificate, ...] = ()  # certificates outside the leaf's chain
    warnings: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def key_matches(self) -> bool | None:
        """True/False when a key is present, None when there is none."""
        if self.key is None:
            return None
        return _public_der(self.key.public_key()) == _public_der(self.leaf.public_key())

    def identity(
        self, *, now: dt.datetime | None = None, warn_before: float = 30 * 86400
    ) -> ClientIdentity:
        """Check that this bundle can authenticate a client now."""
        now = now or _now()
        if self.key is None:
            raise CredentialError(
                f"{self.source}: holds no private key",
                hint="give the key file with credentials.key / --key, or use the full BTP "
                "export (key and certificates in one file)",
            )
        if not self.key_matches:
            raise CredentialError(
                f"{self.source}: the private key does not match the certificate "
                f"{self.leaf.subject.rfc4514_string()}",
                hint="the key and certificate come from different exports; download both "
                "from the same BTP certificate",
            )
        not_before, not_after = self.leaf.not_valid_before_utc, self.leaf.not_valid_after_utc
        if now >= not_after:
            raise CredentialError(
                f"{self.source}: the certificate {self.leaf.subject.rfc4514_string()} "
                f"expired on {not_after:%Y-%m-%d %H:%M} UTC",
                hint="generate a new certificate in SAP BTP and update the X.509 mapping "
                "in SuccessFactors",
            )
        if now < not_before:
            raise CredentialError(
                f"{self.source}: the certificate {self.leaf.subject.rfc4514_string()} "
                f"is not valid before {not_before:%Y-%m-%d %H:%M} UTC",
                hint="check the system clock, or wait until the certificate becomes valid",
            )
        warnings = list(self.warnings)
        left = (not_after - now).total_seconds()
        if left < warn_before:
            warnings.append(
                f"{self.source}: the certificate expires in {left / 86400:.0f} days "
                f"({not_after:%Y-%m-%d}); renew it in SAP BTP before then"
            )
        return ClientIdentity(
            chain=self.chain, key=self.key, source=self.source, warnings=tuple(warnings)
        )


@dataclass(frozen=True)
class ClientIdentity:
    """A usable client identity: a currently valid leaf, its chain and its key."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey = field(repr=False)
    source: str
    warnings: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def presented_chain(self) -> tuple[x509.Certificate, ...]:
        """The leaf and intermediates; a self-signed root is not sent."""
        if len(self.chain) > 1 and _self_signed(self.chain[-1]):
            return self.chain[:-1]
        return self.chain

    def __repr__(self) -> str:
        return f"ClientIdentity({self.leaf.subject.rfc4514_string()!r}, source={self.source!r})"


def read_bundle(
    *,
    pem: Path | None = None,
    key: Path | None = None,
    pkcs12_path: Path | None = None,
    password: bytes | None = None,
) -> Bundle:
    """Read a bundle from files: ``pem`` (+ optional ``key``) or ``pkcs12_path``."""
    main = pem or pkcs12_path
    if main is None:
        raise CredentialError("no certificate file given", hint="give --cert or --pkcs12")
    data = _read_file(main)
    bundle = read_bundle_bytes(
        data, source=str(main), password=password, pkcs12_hint=pkcs12_path is not None
    )
    if key is not None:
        if bundle.key is not None:
            raise CredentialError(
                f"{main}: already holds a private key, and {key} was given as well",
                hint="drop credentials.key / --key, or remove the key from the bundle",
            )
        key_obj = _read_key_file(key, password)
        bundle = _assemble(list(bundle.chain) + list(bundle.extra), key_obj, str(main),
                           list(bundle.warnings))  # fmt: skip
        bundle = _with_permission_warning(bundle, key)
    elif bundle.key is not None:
        bundle = _with_permission_warning(bundle, main)
    return bundle


def read_bundle_bytes(
    data: bytes,
    *,
    source: str,
    password: bytes | None = None,
    pkcs12_hint: bool = False,
) -> Bundle:
    """Detect the format of ``data`` and read it. ``source`` names it in messages."""
    if not data.strip():
        raise CredentialError(f"{source}: the file is empty", hint="download the bundle again")
    for magic, name in _JKS_MAGIC.items():
        if data.startswith(magic):
            raise CredentialError(
                f"{source}: is a Java {name} keystore, which is not supported",
                hint="convert it: keytool -importkeystore -srckeystore FILE -destkeystore "
                "client.p12 -deststoretype PKCS12, then use credentials.pkcs12",
            )
    if b"-----BEGIN" in data:
        return _read_pem(data, source, password)
    unwrapped = _unbase64(data)
    if unwrapped is not None:
        if b"-----BEGIN" in unwrapped:
            return _read_pem(unwrapped, f"{source} (base64-wrapped PEM)", password)
        if unwrapped[:1] == b"\x30":
            return _read_der(unwrapped, f"{source} (base64)", password, pkcs12_hint)
    if data[:1] == b"\x30":
        return _read_der(data, source, password, pkcs12_hint)
    raise CredentialError(
        f"{source}: not a certificate bundle (expected PEM, base64-wrapped PEM, PKCS#12 "
        "or a DER certificate)",
        hint="check that you picked the certificate file, not another download",
    )


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{path}: file not found", hint="check the path") from None
    except IsADirectoryError:
        raise CredentialError(
            f"{path}: is a directory", hint="give the certificate file inside it"
        ) from None
    except PermissionError:
        raise CredentialError(
            f"{path}: permission denied", hint="make it readable by the sidecar's user"
        ) from None
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_key_file(path: Path, password: bytes | None) -> PrivateKey:
    data = _read_file(path)
    if b"-----BEGIN" not in data:
        data = _unbase64(data) or data
    _, keys = _pem_items(data, str(path), password)
    if not keys:
        raise CredentialError(
            f"{path}: holds no private key", hint="credentials.key must be a PEM private key"
        )
    return keys[0]


def _unbase64(data: bytes) -> bytes | None:
    compact = b"".join(data.split())
    if len(compact) < 16:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _pem_items(
    data: bytes, source: str, password: bytes | None
) -> tuple[list[x509.Certificate], list[PrivateKey]]:
    certs: list[x509.Certificate] = []
    keys: list[PrivateKey] = []
    blocks = list(_PEM_BLOCK.finditer(data))
    if len(blocks) < data.count(b"-----BEGIN "):
        raise CredentialError(
            f"{source}: truncated PEM (a -----BEGIN line has no matching -----END line)",
            hint="download or copy the file again, completely",
        )
    for block in blocks:
        label, text = block.group(1), block.group(0)
        if label in _CERT_LABELS:
            try:
                certs.append(x509.load_pem_x509_certificate(text))
            except ValueError as exc:
                raise CredentialError(
                    f"{source}: a certificate block is damaged: {exc}",
                    hint="download or copy the file again, completely",
                ) from None
        elif label in _KEY_LABELS:
            keys.append(_load_pem_key(text, source, password))
    if len(keys) > 1:
        raise CredentialError(
            f"{source}: holds {len(keys)} private keys; a bundle must hold one",
            hint="keep only the key that belongs to the client certificate",
        )
    return certs, keys


def _read_pem(data: bytes, source: str, password: bytes | None) -> Bundle:
    certs, keys = _pem_items(data, source, password)
    if not certs:
        if keys:
            raise CredentialError(
                f"{source}: holds a private key but no certificate",
                hint="give this file as credentials.key / --key and the certificate as pem",
            )
        raise CredentialError(
            f"{source}: holds no certificate",
            hint="give the file with the -----BEGIN CERTIFICATE----- blocks, not a "
            "certificate request or a public key",
        )
    return _assemble(certs, keys[0] if keys else None, source, [])


def _load_pem_key(text: bytes, source: str, password: bytes | None) -> PrivateKey:
    encrypted = b"ENCRYPTED" in text.split(b"\n", 2)[0] or b"Proc-Type: 4,ENCRYPTED" in text
    try:
        key = serialization.load_pem_private_key(text, password if encrypted else None)
    except TypeError:
        raise PasswordError(
            f"{source}: the private key is encrypted and no password was given",
            hint="set credentials.password_env or password_file (--password-env / --password-file)",
        ) from None
    except ValueError as exc:
        if encrypted:
            raise PasswordError(
                f"{source}: wrong password for the encrypted private key",
                hint="check the password variable or file",
            ) from None
        raise CredentialError(f"{source}: the private key is damaged: {exc}") from None
    except Exception as exc:  # unsupported algorithms raise UnsupportedAlgorithm
        raise CredentialError(f"{source}: cannot read the private key: {exc}") from None
    if not isinstance(key, PrivateKey):
        raise CredentialError(f"{source}: unsupported private key type {type(key).__name__}")
    return key


def _read_der(data: bytes, source: str, password: bytes | None, pkcs12_hint: bool) -> Bundle:
    try:
        try:
            p12 = pkcs12.load_pkcs12(data, password)
        except ValueError:
            if password is None:
                raise
            # A password configured for an unencrypted PKCS#12 is not an error.
            p12 = pkcs12.load_pkcs12(data, None)
    except ValueError as exc:
        p12_error: Exception | None = exc
    else:
        p12_error = None
    if p12_error is None:
        key = p12.key
        if key is not None and not isinstance(key, PrivateKey):
            raise CredentialError(f"{source}: unsupported private key type in PKCS#12")
        entries = ([p12.cert] if p12.cert else []) + list(p12.additional_certs)
        certs = [c.certificate for c in entries]
        if not certs:
            raise CredentialError(f"{source}: the PKCS#12 file holds no certificate")
        return _assemble(certs, key, source, [])
    with contextlib.suppress(ValueError):
        cert = x509.load_der_x509_certificate(data)
        return _assemble([cert], None, f"{source} (DER certificate)", [])
    message = str(p12_error)
    if "password" in message.lower() or "mac" in message.lower() or pkcs12_hint:
        if password is None:
            raise PasswordError(
                f"{source}: the PKCS#12 file needs a password, or it is damaged",
                hint="set credentials.password_env or password_file (--password-env / "
                "--password-file)",
            )
        raise PasswordError(
            f"{source}: wrong password for the PKCS#12 file, or the file is damaged",
            hint="check the password variable or file",
        )
    raise CredentialError(
        f"{source}: not a certificate bundle (DER data that is neither PKCS#12 nor a certificate)",
        hint="check that you picked the certificate file",
    )


# ---------------------------------------------------------------- chain and checks


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _order(
    certs: list[x509.Certificate], key: PrivateKey | None
) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """The leaf's chain leaf-first, and the certificates outside it."""
    unique: list[x509.Certificate] = []
    for c in certs:
        if c not in unique:
            unique.append(c)
    leaf: x509.Certificate | None = None
    if key is not None:
        wanted = _public_der(key.public_key())
        leaf = next((c for c in unique if _public_der(c.public_key()) == wanted), None)
    if leaf is None:
        issuers = {c.issuer for c in unique if not _self_signed(c)}
        candidates = [c for c in unique if c.subject not in issuers]
        non_ca = [c for c in candidates if not _is_ca(c)]
        leaf = (non_ca or candidates or unique)[0]
    chain = [leaf]
    rest = [c for c in unique if c is not leaf]
    while not _self_signed(chain[-1]):
        parent = next((c for c in rest if c.subject == chain[-1].issuer), None)
        if parent is None:
            break
        chain.append(parent)
        rest.remove(parent)
    return chain, rest


def _assemble(
    certs: list[x509.Certificate], key: PrivateKey | None, source: str, warnings: list[str]
) -> Bundle:
    chain, extra = _order(certs, key)
    leaf = chain[0]
    warnings = list(warnings)
    if _is_ca(leaf):
        warnings.append(
            f"{source}: the leaf certificate {leaf.subject.rfc4514_string()} is a CA "
            "certificate; servers usually refuse CA certificates as client identities — use "
            "the client certificate BTP generated"
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if (
            ExtendedKeyUsageOID.CLIENT_AUTH not in eku
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
        ):
            warnings.append(
                f"{source}: the certificate {leaf.subject.rfc4514_string()} lacks the "
                "clientAuth extended key usage; the server may reject it — issue a client "
                "certificate"
            )
    if len(chain) == 1 and not _self_signed(leaf):
        warnings.append(
            f"{source}: only the leaf is present; its issuer {leaf.issuer.rfc4514_string()} "
            "is not in the bundle — if the server does not know that intermediate, add it "
            "(the BTP export has the full chain)"
        )
    for c in extra:
        warnings.append(
            f"{source}: the certificate {c.subject.rfc4514_string()} is not part of the "
            "leaf's chain and is not sent"
        )
    return Bundle(
        chain=tuple(chain), key=key, source=source, extra=tuple(extra), warnings=tuple(warnings)
    )


def _with_permission_warning(bundle: Bundle, key_path: Path) -> Bundle:
    try:
        mode = key_path.stat().st_mode
    except OSError:
        return bundle
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warning = (
            f"{key_path}: holds a private key and is readable by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {key_path}"
        )
        return Bundle(bundle.chain, bundle.key, bundle.source, bundle.extra,
                      bundle.warnings + (warning,))  # fmt: skip
    return bundle


# -------------------------------------------------------------------- SSL contexts


def client_ssl_context(
    identity: ClientIdentity | None, *, ca_file: Path | None = None
) -> ResumingContext:
    """A verifying TLS ≥1.2 client context presenting ``identity``'s chain.

    The key travels to OpenSSL through an anonymous memory file, so it never
    touches a file system (a 0600 temporary file removed at once is the
    fallback where ``memfd_create`` does not exist).
    """
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
    ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)  # honours SSL_CERT_FILE / SSL_CERT_DIR
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Some SAP servers ask for the certificate after the handshake (TLS 1.3 PHA).
    ctx.post_handshake_auth = True
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except FileNotFoundError:
            raise CredentialError(
                f"{ca_file}: CA file not found (tls.ca_file)", hint="check the path"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise CredentialError(
                f"{ca_file}: not a PEM CA certificate file (tls.ca_file): {exc}",
                hint="give the PEM file of the CA that signed the upstream's certificate",
            ) from None
    if identity is not None:
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM)
                       for c in identity.presented_chain)  # fmt: skip
        pem += identity.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with _secret_file(pem) as path:
            ctx.load_cert_chain(path)
    return ctx


@contextlib.contextmanager
def _secret_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, that no other process can."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mtls-sidecar-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    # No memfd (macOS, Windows): a 0600 file in a new 0700 directory (on Windows, the
    # user's own TEMP), both removed as soon as OpenSSL has read the file.
    with tempfile.TemporaryDirectory(prefix="mtls-sidecar-") as private:
        path = os.path.join(private, "identity.pem")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(path, flags, 0o600), "wb") as f:
            f.write(data)
        yield path
