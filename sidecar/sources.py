"""Where a route's client identity comes from.

A `CredentialSource` yields the current `ClientIdentity` of a route. Files
(PEM or PKCS#12) are read here; the SAP BTP Destination Service is the other
implementation (sidecar.destination).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from sidecar.config import CredentialsConfig, RouteConfig
from sidecar.errors import CredentialError
from sidecar.identity import Bundle, ClientIdentity, read_bundle, read_password


class CredentialSource(Protocol):
    """Something that can produce a route's client identity."""

    description: str

    def load(self) -> ClientIdentity:
        """Read the identity now; raise a `SidecarError` when it cannot be used."""
        ...


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
    """PEM or PKCS#12 files; `fingerprint` tells when they changed on disk."""

    def __init__(
        self, creds: CredentialsConfig, *, where: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.creds = creds
        self.where = where
        self.env = os.environ if env is None else env
        main = creds.pem or creds.pkcs12
        self.description = f"{creds.kind} {main}"

    def load(self, now: dt.datetime | None = None) -> ClientIdentity:
        bundle = read_file_bundle(self.creds, where=self.where, env=self.env)
        return bundle.identity(now=now, warn_before=self.creds.warn_before)

    def fingerprint(self) -> tuple[tuple[str, float, int, int], ...]:
        """Stat data of every file involved, to notice replaced or edited files."""
        out = []
        for p in self.creds.files:
            try:
                st = Path(p).stat()
                out.append((str(p), st.st_mtime, st.st_size, st.st_ino))
            except OSError:
                out.append((str(p), 0.0, -1, 0))
        return tuple(out)


def source_for(route: RouteConfig, index: int, env: Mapping[str, str] | None = None) -> FileSource:
    """The credential source a route's config describes."""
    where = f"routes[{index}].credentials"
    if route.credentials.destination is not None:
        raise CredentialError(
            f"{where}.destination: credentials from the SAP BTP Destination Service are not "
            "available in this version",
            hint="export the bundle from BTP and use credentials.pem or credentials.pkcs12",
        )
    return FileSource(route.credentials, where=where, env=env)
