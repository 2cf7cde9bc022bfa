"""Where a route's client identity comes from, and when to look again.

A `CredentialSource` yields `Loaded` credentials: the client identity, plus
what a source may say about the target (the Destination Service supplies the
URL, headers and query parameters). Two implementations: `FileSource` (PEM or
PKCS#12 files, re-read when they change) and the Destination Service source
in sidecar.credentials.destination_source. Which one a route uses is decided
above this package (sidecar.runtime.source_for), so this module does not
import the destination source that implements its protocol.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sidecar.config import CredentialsConfig, UpstreamURL
from sidecar.credentials.identity import Bundle, ClientIdentity, read_bundle, read_password

FILE_POLL_INTERVAL = 2.0  # seconds between looks at credential files


@dataclass(frozen=True)
class Loaded:
    """What a source produced: an identity and, optionally, target details."""

    identity: ClientIdentity
    upstream: UpstreamURL | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)


class CredentialSource(Protocol):
    """Something that can produce a route's client identity, again and again."""

    description: str
    poll_interval: float  # seconds between `changed()` checks

    async def changed(self) -> bool:
        """Whether `load()` may produce something new (cheap)."""
        ...

    async def load(self) -> Loaded | None:
        """Fetch and validate now; None when the source says nothing changed.

        Raises `SidecarError` when the credentials cannot be used.
        """
        ...

    async def close(self) -> None: ...


def read_file_bundle(
    creds: CredentialsConfig, *, where: str, env: Mapping[str, str] | None = None
) -> Bundle:
    """Read the files a route's credentials name, with the configured password."""
    password = read_password(
        password_env=creds.password_env,
        password_file=creds.password_file,
        env=env,
        env_label=f"{where}.password_env",
        file_label=f"{where}.password_file",
    )
    return read_bundle(pem=creds.pem, key=creds.key, pkcs12_path=creds.pkcs12, password=password)


class FileSource:
    """PEM or PKCS#12 files; a change of inode, size or mtime means "read again".

    `Path.stat` follows symlinks, so the Kubernetes secret volume's swap of
    its ``..data`` link shows up as a new inode.
    """

    poll_interval = FILE_POLL_INTERVAL

    def __init__(
        self, creds: CredentialsConfig, *, where: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.creds = creds
        self.where = where
        self.env = os.environ if env is None else env
        self.description = f"{creds.kind} {creds.pem or creds.pkcs12}"
        self._seen = self.fingerprint()

    async def load(self) -> Loaded:
        self._seen = self.fingerprint()
        bundle = read_file_bundle(self.creds, where=self.where, env=self.env)
        return Loaded(bundle.identity(warn_before=self.creds.warn_before))

    async def changed(self) -> bool:
        return self.fingerprint() != self._seen

    async def close(self) -> None:
        return None

    def fingerprint(self) -> tuple[tuple[str, float, int, int], ...]:
        out = []
        for p in self.creds.files:
            try:
                st = Path(p).stat()
                out.append((str(p), st.st_mtime, st.st_size, st.st_ino))
            except OSError:
                out.append((str(p), 0.0, -1, 0))
        return tuple(out)
