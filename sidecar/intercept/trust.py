"""How each client trusts the interception certificate, and the system store plus it.

Clients differ in one way that matters: some *add* a file to the system's
trust store (Node's ``NODE_EXTRA_CA_CERTS``), most *replace* the store with
the file they are given (curl ``--cacert``, ``REQUESTS_CA_BUNDLE``,
``SSL_CERT_FILE``). For the latter, `trust_bundle` is the system store plus
the interception certificate, as one file (``trust show --bundle OUT``), so
the client still trusts every other site it talks to directly. The system
store is read from where Python's own ``ssl`` module finds it: certifi is
not a dependency, and the operating system's file is the one users keep
current.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from sidecar.errors import UsageError

#: Where distributions keep the system store as one file, when ``ssl`` names none that exists.
KNOWN_STORE_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, BSDs
)


def client_lines(cert_file: Path, proxy: str, host: str, route: str) -> list[str]:
    """One line per client: how it trusts ``cert_file`` and uses the sidecar as its proxy."""
    f = str(cert_file)
    return [
        f"curl:            curl -x {proxy} --cacert {f} https://{host}/...  "
        f"(or CURL_CA_BUNDLE={f})",
        f"Python requests: https_proxy={proxy} REQUESTS_CA_BUNDLE=BUNDLE python3 script.py  "
        "(BUNDLE from `trust show --bundle BUNDLE`: the variable replaces the store)",
        f"Python httpx:    https_proxy={proxy} SSL_CERT_FILE=BUNDLE python3 script.py",
        f"Node.js:         NODE_EXTRA_CA_CERTS={f} (adds to Node's store); proxy: an agent "
        f"for {proxy}, or NODE_USE_ENV_PROXY=1 https_proxy={proxy} on Node 24+",
        f"Java:            keytool -importcert -noprompt -alias mtls-sidecar-{route} -file {f} "
        "-keystore truststore.p12 -storepass changeit; java "
        "-Djavax.net.ssl.trustStore=truststore.p12 -Djavax.net.ssl.trustStorePassword=changeit "
        f"-Dhttps.proxyHost={_host(proxy)} -Dhttps.proxyPort={_port(proxy)} ...",
        f"Postman:         Settings > Certificates > CA certificates: {f}; Settings > Proxy: "
        f"custom proxy {_host(proxy)}:{_port(proxy)} for HTTPS",
        f"Linux store:     sudo cp {f} /usr/local/share/ca-certificates/mtls-sidecar-{route}.crt "
        f"&& sudo update-ca-certificates  (Fedora/RHEL: sudo trust anchor {f})",
        "macOS store:     sudo security add-trusted-cert -d -r trustAsRoot "
        f"-k /Library/Keychains/System.keychain {f}",
        f"Windows store:   certutil -user -addstore Root {f}",
    ]


def _host(proxy: str) -> str:
    return proxy.removeprefix("http://").rpartition(":")[0]


def _port(proxy: str) -> str:
    return proxy.rpartition(":")[2]


def system_store() -> tuple[str, bytes]:
    """Where the system trust store is, and its certificates as PEM.

    ``ssl``'s default file (``SSL_CERT_FILE`` overrides it), OpenSSL's
    compiled-in one, the distributions' usual places; else (Windows) the
    certificates ``ssl`` loads from the system. UsageError when none is found.
    """
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *KNOWN_STORE_FILES):
        if candidate and os.path.isfile(candidate):
            try:
                return candidate, Path(candidate).read_bytes()
            except OSError:
                continue
    ctx = ssl.create_default_context()
    ders = ctx.get_ca_certs(binary_form=True)
    if ders:
        return "the system's store", "".join(ssl.DER_cert_to_PEM_cert(d) for d in ders).encode()
    raise UsageError(
        "no system trust store found to put into the bundle",
        hint="set SSL_CERT_FILE to your system's CA file, or trust the certificate alone "
        "(its file, as printed above)",
    )


def trust_bundle(store: bytes, published: bytes) -> bytes:
    """The system store, then the interception certificate(s): one PEM file."""
    return store.rstrip(b"\n") + b"\n" + published
