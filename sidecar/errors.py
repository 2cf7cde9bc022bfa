"""The exceptions mtls-sidecar raises for users to read.

Every error a user can cause or fix carries a message that says what went
wrong and where (file, key path, header), and a hint that says how to fix it.
The CLI prints them as one line and maps them to exit codes; nothing else
ever reaches the user as a traceback.

    SidecarError
    ├── UsageError          (ValueError)  contradictory command-line use
    ├── ConfigError         (ValueError)  the YAML or a route flag is wrong
    ├── CredentialError     (ValueError)  a bundle cannot be read or is unusable
    │   └── PasswordError                 missing or wrong password
    └── DestinationError    (RuntimeError) the BTP Destination Service said no
        └── DestinationUnavailable        it cannot be reached now: retry later
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base class: a message for the user and an optional hint to fix it."""

    exit_code = 2
    #: True when trying again later may succeed (a service that is down, a 5xx)
    transient = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class UsageError(SidecarError, ValueError):
    """The command line combines options that cannot go together."""


class ConfigError(SidecarError, ValueError):
    """The configuration file or a route flag is invalid."""


class CredentialError(SidecarError, ValueError):
    """A certificate bundle cannot be read, or cannot be used as a client identity."""


class PasswordError(CredentialError):
    """A private key or keystore needs a password that is missing or wrong."""


class DestinationError(SidecarError, RuntimeError):
    """The SAP BTP Destination Service could not supply the credentials."""


class DestinationUnavailable(DestinationError):
    """The Destination Service or XSUAA cannot be reached right now; retry later."""

    transient = True
