"""TLS and mutual TLS for the gRPC port (`--tls-cert`, `--tls-key`, `--tls-client-ca`), reloadable on SIGHUP.

The files are checked at start with Python's `ssl` module, so that a missing or unreadable file, a file that is
no PEM certificate or key, or a key that does not belong to the certificate is one line naming the file (exit 2)
instead of a handshake failure on the first client. grpc's dynamic server credentials ask `_fetch` before every
handshake whether the certificates changed: `reload()` (SIGHUP) reads and checks the files again and hands the new
ones over; connections already open keep theirs, new ones get the new certificate. A reload that fails keeps the
certificates in use and says why. With `--tls-client-ca` every client must present a certificate signed by that
CA (mutual TLS); the set of files is fixed at start, only their contents reload.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import ConfigError

__all__ = ["ServerTls", "TlsFiles", "load_key_pair", "read_pem"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's certificate chain, its key and (for mutual TLS) the client CA are."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, client_ca: str | None,
                   prefix: str = "--tls") -> TlsFiles | None:
        """From the command line: None when no TLS is asked for; ConfigError when the flags do not go together."""
        if not cert and not key:
            if client_ca:
                raise ConfigError(f"{prefix}-client-ca needs {prefix}-cert and {prefix}-key (mutual TLS is TLS too)")
            return None
        if not cert or not key:
            missing = f"{prefix}-key" if cert else f"{prefix}-cert"
            raise ConfigError(f"{prefix}-cert and {prefix}-key go together: {missing} is missing")
        return cls(cert, key, client_ca or None)

    def check(self) -> None:
        """ConfigError naming the file when one is missing, unreadable, no PEM, or when key and certificate differ."""
        read_pem(self.cert, "--tls-cert", "CERTIFICATE")
        read_pem(self.key, "--tls-key", "PRIVATE KEY")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_key_pair(ctx, self.cert, self.key)
        if self.client_ca:
            read_pem(self.client_ca, "--tls-client-ca", "CERTIFICATE")
            try:
                ctx.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as e:
                raise ConfigError(f"--tls-client-ca {self.client_ca} holds no usable CA certificate: "
                                  f"{e.reason or e}") from None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files, checked, as grpc's certificate configuration (ConfigError naming the file otherwise)."""
        self.check()
        pairs = [(read_pem(self.key, "--tls-key", "PRIVATE KEY"), read_pem(self.cert, "--tls-cert", "CERTIFICATE"))]
        ca = read_pem(self.client_ca, "--tls-client-ca", "CERTIFICATE") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(pairs, root_certificates=ca)


def read_pem(path: str, flag: str, kind: str) -> bytes:
    """The bytes of a PEM file holding a `kind` block ('CERTIFICATE', 'PRIVATE KEY'); ConfigError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        what = "a private key" if kind == "PRIVATE KEY" else "a certificate"
        raise ConfigError(f"{flag} {path} is not {what} in PEM format (-----BEGIN {kind}-----)")
    return data


class _EncryptedKeyError(Exception):
    """The key file asks for a passphrase."""


def _no_passphrase() -> bytes:
    raise _EncryptedKeyError


def load_key_pair(ctx: ssl.SSLContext, cert: str, key: str, cert_flag: str = "--tls-cert",
                  key_flag: str = "--tls-key") -> None:
    """`cert` and `key` into `ctx`; ConfigError naming the file: a key of another certificate, an encrypted key
    (OpenSSL would otherwise ask for its passphrase on the terminal, holding up a start or a SIGHUP), or unusable."""
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKeyError:
        raise ConfigError(f"{key_flag} {key} is encrypted: give it unencrypted (openssl pkey -in {key} -out "
                          "KEY.pem), readable by its user only") from None
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "mismatch" in str(e).lower():
            raise ConfigError(f"{key_flag} {key} does not belong to {cert_flag} {cert} (the key of another "
                              "certificate)") from None
        raise ConfigError(f"{cert_flag} {cert} / {key_flag} {key} cannot be used: {e.reason or e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {cert_flag} {cert} or {key_flag} {key}: {e.strerror or e}") from None


class ServerTls:
    """The gRPC server's TLS credentials, whose certificates `reload()` replaces for new connections."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._initial = files.configuration()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()
        self.reloads = 0  # certificate sets handed to grpc since start

    @property
    def mutual(self) -> bool:
        """True when clients must present a certificate."""
        return self.files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port` (one set per server: grpc keeps asking it for changes)."""
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch,
                                                   require_client_authentication=self.mutual)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's question before each handshake (from its own threads): new certificates, or None for no change."""
        with self._lock:
            config, self._pending = self._pending, None
            if config is not None:
                self.reloads += 1
        return config

    def reload(self) -> None:
        """Read the files again; the next handshakes use them. ConfigError (the old ones stay) when they are bad."""
        config = self.files.configuration()
        with self._lock:
            self._pending = config
        log.info("TLS: certificate %s reloaded%s", self.files.cert,
                 f", client CA {self.files.client_ca}" if self.files.client_ca else "")
