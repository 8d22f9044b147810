"""The server's security settings in one place: TLS, tokens, reflection, /metrics over HTTPS, masked logs; SIGHUP.

`SecurityConfig` is what the command line says; `Security` is its running form for one server: the TLS credentials
(tls.py), the token table (auth.py), the interceptors every call passes (auth, then the malformed-request guard of
guard.py) and `reload()`, run on SIGHUP, which reads certificates and tokens again (each on its own: a broken
token file does not stop new certificates) and keeps what it had when a file is bad. `install_log_redaction()`
masks URL credentials in every log line the process writes (urls.py), whoever logs them. docs/security.md is the
operator's guide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from .auth import AuthInterceptor, TokenTable
from .errors import ConfigError
from .guard import GuardInterceptor
from .tls import ServerTls, TlsFiles
from .urls import redact_text

__all__ = ["RedactingFilter", "Security", "SecurityConfig", "install_log_redaction"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecurityConfig:
    """What the command line asks for: --tls-cert/--tls-key/--tls-client-ca, --auth-token-file, --no-reflection,
    --metrics-tls."""

    tls: TlsFiles | None = None
    token_file: str | None = None
    reflection: bool = True
    metrics_tls: bool = False  # /metrics over HTTPS with the gRPC certificate (and, with a client CA, mutual TLS)

    def __post_init__(self) -> None:
        if self.metrics_tls and self.tls is None:
            raise ConfigError("--metrics-tls serves /metrics with the gRPC certificate: give --tls-cert and --tls-key")


class Security:
    """One server's TLS credentials, tokens and interceptors; ConfigError naming the file when one is bad."""

    def __init__(self, config: SecurityConfig | None = None) -> None:
        self.config = config or SecurityConfig()
        self.tls = ServerTls(self.config.tls) if self.config.tls is not None else None
        self.tokens = TokenTable.load(self.config.token_file) if self.config.token_file else None
        self._on_reload: list[tuple[str, Callable[[], None]]] = []
        self._auth: AuthInterceptor | None = None  # made with the interceptors; ends calls a token reload revokes

    @property
    def reflection(self) -> bool:
        """Whether server reflection is offered (it then needs a viewer token when tokens are on)."""
        return self.config.reflection

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The interceptors, outermost first: the token check answers before a request is read."""
        chain: list[grpc.aio.ServerInterceptor] = []
        if self.tokens is not None:
            self._auth = AuthInterceptor(self._table)
            chain.append(self._auth)
        chain.append(GuardInterceptor())
        return chain

    def _table(self) -> TokenTable:
        assert self.tokens is not None
        return self.tokens

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for the gRPC port, or None for plaintext."""
        return self.tls.credentials() if self.tls is not None else None

    def on_reload(self, what: str, action: Callable[[], None]) -> None:
        """Run `action` too on every reload (the /metrics endpoint's certificate, the MQTT client certificate); it
        raises ConfigError when bad, and `what` names it in the log line."""
        self._on_reload.append((what, action))

    def reload(self) -> bool:
        """SIGHUP: read certificates and tokens again; True when all of them reloaded (failures are logged, and
        what was in use stays in use)."""
        ok = True
        actions: list[tuple[str, Callable[[], None]]] = []
        if self.tls is not None:
            actions.append(("TLS certificates", self.tls.reload))
        if self.config.token_file:
            actions.append(("tokens", self._reload_tokens))
        actions += self._on_reload
        for what, action in actions:
            try:
                action()
            except ConfigError as e:
                ok = False
                log.error("SIGHUP: %s not reloaded, the ones in use stay: %s", what, e)
        return ok

    def _reload_tokens(self) -> None:
        assert self.config.token_file
        table = TokenTable.load(self.config.token_file)
        self.tokens = table
        if self._auth is not None:
            self._auth.revoke(table)  # watches whose token went end now, not when their client leaves
        counts = table.counts()
        log.info("tokens reloaded from %s: %d operator, %d viewer", table.path, counts["operator"], counts["viewer"])

    def describe(self) -> str:
        """How the gRPC port is protected, in a few words (the start-up line)."""
        transport = "plaintext" if self.tls is None else "mutual TLS" if self.tls.mutual else "TLS"
        if self.tokens is None:
            return f"{transport}, no tokens"
        counts = self.tokens.counts()
        return f"{transport}, tokens ({counts['operator']} operator, {counts['viewer']} viewer)"

    def warn_if_open(self, host: str) -> None:
        """Log what is exposed when the port has no TLS or no tokens (docs/security.md says what to do)."""
        local = host in ("127.0.0.1", "::1", "localhost")
        if self.tokens is None and not local:
            log.warning("gRPC on %s without --auth-token-file: anyone who reaches the port can add and remove "
                        "cameras and read every detection (docs/security.md)", host)
        if self.tokens is not None and self.tls is None and not local:
            log.warning("--auth-token-file without --tls-cert: tokens cross the network in clear text; use TLS "
                        "unless a proxy in front of this server terminates it")


class RedactingFilter(logging.Filter):
    """Masks URL credentials (urls.redact_text) in a record's message and traceback before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it does
            return True
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add a RedactingFilter to every handler of `logger` (the root logger by default); returns it."""
    logger = logger or logging.getLogger()
    flt = RedactingFilter()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
