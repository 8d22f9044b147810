"""An OPC UA server (`--opcua opc.tcp://HOST:PORT`): what a plant's PLCs (Siemens S7-1500, Beckhoff, B&R) and SCADA
(Ignition, WinCC, Kepware) read without a gRPC client or an MQTT broker. Optional: the `opcua` extra (asyncua).

Address space, namespace NAMESPACE (string NodeIds, stable across restarts: a client's configured tags survive them):

  Objects/Yolov12Serve                   Yolov12Serve
    Status            String             Yolov12Serve.Status: starting, serving, unhealthy (no device healthy), draining
    Cameras                              Cameras
      <stream id>                        Cameras.<id>
        State         String             Cameras.<id>.State: CONNECTING, STREAMING, RECONNECTING, ...
        Streaming     Boolean            Cameras.<id>.Streaming
        Fps           Float              Cameras.<id>.Fps           results a second, refreshed every second
        LatencyP99Ms  Float              Cameras.<id>.LatencyP99Ms  ingest to publish, refreshed every second
        Reconnects    UInt32             Cameras.<id>.Reconnects
        PictureProblem String            Cameras.<id>.PictureProblem: '', blank, frozen
        LastError     String             Cameras.<id>.LastError (credentials masked, as everywhere)
        (cameras added with track:)
        Objects       UInt64             Cameras.<id>.Objects: objects counted since the camera was added
        ObjectsByClass/<class> UInt64    Cameras.<id>.ObjectsByClass.<class>
        LastObject/Class, Score (Float), TrackId (UInt64), CaptureTime (DateTime)   Cameras.<id>.LastObject.<name>

Every variable is read-only; there are no methods, and clients may not add, delete or write nodes. A camera's nodes
appear when it is added and go when it is removed (a camera removed and added again starts from 0). States, status
and objects are written when they change (looked at every TICK_S); rates every RATES_EVERY_S.

Security: without a certificate the endpoint is unencrypted (security policy None: anyone who reaches the port reads
the cameras' states and counts; a warning at start says so). With --opcua-cert/--opcua-key (RSA, PEM or DER) only
Basic256Sha256 Sign and SignAndEncrypt are offered; the certificate's URI subjectAltName is the application URI.
--opcua-trust (a certificate file or a folder of them: CAs and clients' own certificates) limits the clients to
those it holds; without it any client with a certificate is served (encrypted, not authenticated). --opcua-users
(opcua_users.py; only with a certificate: passwords never cross an unencrypted channel) makes a session log in with
a user name and password of its file; anonymous sessions are then refused.

SIGHUP reads the certificate and key, the trust list and the users file again (`reloads`, run by security.py's
reload, each on its own): new sessions get them, sessions already open keep the certificate and user they began
with; a file that cannot be used is one log line and what was in use stays. Which of them are given is fixed at
start: a reload cannot switch encryption or user names on or off, nor change the application URI.

The server runs in a thread of its own with its own asyncio loop: the gRPC loop carries every watcher's results, and
OPC UA's per-message signing and encryption (RSA, AES) and its clients' subscriptions must not run between them;
the core is threads, and a blocking start()/close() fits it as the MQTT publisher's does. It reads results from a
fan-out subscription of its own (only tracked cameras' results cost more than a look); without --opcua there is no
subscription, no thread, and asyncua is never imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .camera_tags import ObjectTally, camera_rates, camera_states
from .errors import ConfigError
from .fanout import Subscription
from .faultlog import FaultLog
from .frames import FrameResult
from .opcua_users import LoginLimiter, UserTable

__all__ = ["NAMESPACE", "OpcUaOptions", "OpcUaServer", "check_installed", "load_identity", "load_trust",
           "load_users"]

log = logging.getLogger(__name__)

NAMESPACE = "urn:yolov12-serve"
TICK_S = 0.25  # camera set, states, status, sessions: compared this often
RATES_EVERY_S = 1.0  # Fps and LatencyP99Ms
INSTALL_HINT = 'pip install ".[opcua]" in the project folder (scripts/setup test installs it too)'
_NO_TIME = dt.datetime(1601, 1, 1, tzinfo=dt.timezone.utc)  # OPC UA's null DateTime: no object yet


def check_installed() -> None:
    """ConfigError when asyncua is not installed (one line saying how to install it)."""
    try:
        import asyncua  # noqa: F401
    except ImportError:
        raise ConfigError(f"--opcua needs the asyncua package, which is not installed: {INSTALL_HINT}") from None


@dataclass(frozen=True)
class OpcUaOptions:
    """Where to listen (`opc.tcp://HOST[:PORT]`, port 4840 by default) and, for encrypted sessions only, the
    server's certificate and key (`cert`, `key`), the clients' trusted certificates (`trust`) and the users file
    (`users`)."""

    url: str
    cert: str | None = None
    key: str | None = None
    trust: str | None = None
    users: str | None = None

    def __post_init__(self) -> None:
        self.address  # noqa: B018 (parsed now: a bad URL stops the server at start)
        if (self.cert is None) != (self.key is None):
            raise ConfigError(f"--opcua-cert and --opcua-key go together: "
                              f"{'--opcua-key' if self.cert else '--opcua-cert'} is missing")
        if self.trust is not None and self.cert is None:
            raise ConfigError("--opcua-trust is for encrypted sessions: give --opcua-cert and --opcua-key too")
        if self.users is not None and self.cert is None:
            raise ConfigError("--opcua-users: user names and passwords must not cross an unencrypted channel: give "
                              "--opcua-cert and --opcua-key too")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to listen on; ConfigError for a URL that is not one."""
        parts = urlsplit(self.url)
        if parts.scheme != "opc.tcp" or not parts.hostname or parts.query or parts.fragment or parts.username:
            raise ConfigError(f"--opcua {self.url}: expected opc.tcp://HOST:PORT (e.g. opc.tcp://0.0.0.0:4840)")
        if parts.path not in ("", "/"):  # clients are given the endpoint without it: a path would be ignored
            raise ConfigError(f"--opcua {self.url}: the server takes no path: give opc.tcp://HOST:PORT (clients "
                              "connect to opc.tcp://HOST:PORT)")
        try:
            port = parts.port if parts.port is not None else 4840
        except ValueError:
            raise ConfigError(f"--opcua {self.url}: the port must be 1..65535") from None
        if port == 0:
            raise ConfigError(f"--opcua {self.url}: the port must be 1..65535 (PLCs are configured with it)")
        return parts.hostname, port

    @property
    def secure(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class Identity:
    """The server's certificate and private key (cryptography objects) and the application URI its certificate
    names."""

    cert: Any
    key: Any
    uri: str


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror or e}") from None


def _certificates(data: bytes, path: str, flag: str) -> list[Any]:
    """The certificates in a PEM (one or more) or DER file; ConfigError naming it when it holds none."""
    from cryptography import x509

    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError(f"{flag} {path}: not an X.509 certificate in PEM or DER") from None


def load_identity(options: OpcUaOptions) -> Identity:
    """--opcua-cert and --opcua-key read and checked: an RSA key of 2048 to 4096 bits (Basic256Sha256), unencrypted,
    belonging to the certificate, which names the application URI in a URI subjectAltName; ConfigError naming the
    file and what is wrong."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    assert options.cert is not None and options.key is not None
    cert = _certificates(_read(options.cert, "--opcua-cert"), options.cert, "--opcua-cert")[0]
    data = _read(options.key, "--opcua-key")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"--opcua-key {options.key} is encrypted: give it unencrypted (readable by the server's "
                          "user only)") from None
    except ValueError:
        raise ConfigError(f"--opcua-key {options.key}: not a private key in PEM or DER") from None
    if not isinstance(key, rsa.RSAPrivateKey) or not 2048 <= key.key_size <= 4096:
        raise ConfigError(f"--opcua-key {options.key}: Basic256Sha256 needs an RSA key of 2048 to 4096 bits")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ConfigError(f"--opcua-key {options.key} does not belong to --opcua-cert {options.cert}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise ConfigError(f"--opcua-cert {options.cert}: an OPC UA application certificate names its application "
                          "URI in a URI subjectAltName (e.g. URI:urn:HOST:yolov12-serve); this one has none")
    return Identity(cert, key, uris[0])


@dataclass(frozen=True)
class Trust:
    """Trusted client certificates: CAs (whose certificates they signed are trusted) and clients' own (pinned)."""

    cas: tuple[Any, ...] = ()
    pinned: frozenset[bytes] = frozenset()  # SHA-256 fingerprints
    verifier: Any = field(default=None, compare=False)  # of the CAs (cryptography's), None without any

    def __len__(self) -> int:
        return len(self.cas) + len(self.pinned)


def load_trust(path: str) -> Trust:
    """--opcua-trust: a certificate file (PEM, one or more; or DER) or a folder of them (every file in it, whatever its
    name ends with); CA certificates trust what they signed, others are trusted as they are. ConfigError when a file
    is no certificate or none is found."""
    from asyncua.crypto.truststore import TrustStore
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    root = Path(path)
    if not root.exists():
        raise ConfigError(f"--opcua-trust {path}: no such file or folder")
    try:
        files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")) if root.is_dir() \
            else [root]
    except OSError as e:
        raise ConfigError(f"--opcua-trust {path}: {e.strerror or e}") from None
    cas, pinned = [], set()
    for file in files:
        for cert in _certificates(_read(str(file), "--opcua-trust"), str(file), "--opcua-trust"):
            try:
                is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                is_ca = False
            if is_ca:
                cas.append(cert)
            else:
                pinned.add(cert.fingerprint(hashes.SHA256()))
    if not cas and not pinned:
        raise ConfigError(f"--opcua-trust {path}: no certificate in it")
    verifier = None
    if cas:  # asyncua's own policy: CAs need basicConstraints CA, a client's extensions are not judged
        verifier = TrustStore([], []).policy_builder.store(x509.verification.Store(cas)).build_client_verifier()
    return Trust(tuple(cas), frozenset(pinned), verifier)


def load_users(path: str) -> UserTable:
    """--opcua-users read and checked (opcua_users.py); ConfigError naming the file and line."""
    return UserTable.load(path)


def _client_validator(current: Callable[[], Trust]) -> Callable[[Any, Any], Any]:
    """asyncua's certificate check at CreateSession: valid now, its URI the client's application URI, and trusted
    (pinned, or signed by a trusted CA) by the trust list in use (`current()`: SIGHUP may replace it); else the
    session is refused with the OPC UA status that says why."""
    from asyncua import ua
    from asyncua.common.utils import ServiceError
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    async def validate(cert: Any, app: Any) -> None:
        trust = current()
        name = cert.subject.rfc4514_string()
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            log.warning("opcua: refused a session: the client certificate %s is not valid now", name)
            raise ServiceError(ua.StatusCodes.BadCertificateTimeInvalid)
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if app.ApplicationUri not in uris:  # OPC UA Part 4: the certificate names the application it is for
            log.warning("opcua: refused a session: the client certificate %s does not name its application URI %s",
                        name, app.ApplicationUri)
            raise ServiceError(ua.StatusCodes.BadCertificateUriInvalid)
        if cert.fingerprint(hashes.SHA256()) in trust.pinned:
            return
        if trust.verifier is not None:
            try:
                trust.verifier.verify(cert, [])
                return
            except x509.verification.VerificationError:
                pass
        log.warning("opcua: refused a session: the client certificate %s (application %s) is not in --opcua-trust",
                    name, app.ApplicationUri)
        raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    return validate


def _user_manager(current: Callable[[], UserTable | None], limiter: LoginLimiter | None = None) -> Any:
    """asyncua's login check at ActivateSession with --opcua-users: a user name and password of the users file in
    use (`current()`: SIGHUP may replace it); else None, which asyncua answers BadUserAccessDenied, and a warning.
    `limiter` bounds the checks (asyncua runs this on its loop: each costs ~50 ms)."""
    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.server.user_managers import UserManager

    limiter = limiter or LoginLimiter()
    refusals = FaultLog(log, "opcua")  # a line per episode (and per user name), then summaries: not one per refusal

    class Users(UserManager):
        def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                     certificate: Any = None) -> Any:
            if not limiter.allow():
                return None
            table = current()
            if table is not None and table.check(username, password):
                refusals.ok("a user logged in again")
                return User(role=UserRole.User, name=username)
            refusals.failed(f"refused a session: user {(username or '')[:64]!r} is not in --opcua-users or its "
                            "password is wrong")
            return None

    return Users()


def _read_only_rules() -> Any:
    """The requests any client may make: sessions, reads, browsing, subscriptions. No Write, Call, AddNodes,
    DeleteNodes, AddReferences, DeleteReferences, RegisterServer or HistoryUpdate."""
    from asyncua import ua
    from asyncua.crypto.permission_rules import PermissionRuleset

    allowed = {ua.NodeId(getattr(ua.ObjectIds, f"{name}Request_Encoding_DefaultBinary")) for name in (
        "CreateSession", "CloseSession", "ActivateSession", "Read", "Browse", "BrowseNext", "GetEndpoints",
        "FindServers", "TranslateBrowsePathsToNodeIds", "CreateSubscription", "ModifySubscription",
        "DeleteSubscriptions", "TransferSubscriptions", "CreateMonitoredItems", "ModifyMonitoredItems",
        "DeleteMonitoredItems", "SetMonitoringMode", "SetPublishingMode", "Publish", "Republish",
        "CloseSecureChannel", "RegisterNodes", "UnregisterNodes")}

    class ReadOnly(PermissionRuleset):
        def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
            return action_type_id in allowed

    return ReadOnly()


def _refuse_unencrypted() -> Any:
    """A security policy None that refuses every request of a session (GetEndpoints, which needs none, stays open: a
    client learns the Basic256Sha256 endpoints so). asyncua serves a None secure channel whether or not None is
    among the endpoints, with no check on its requests: a client that skips its own endpoint check (asyncua's does
    it client-side) could open an unencrypted session and read everything."""
    from asyncua import ua
    from asyncua.crypto.permission_rules import PermissionRuleset
    from asyncua.crypto.security_policies import SecurityPolicyFactory, SecurityPolicyNone

    class Nothing(PermissionRuleset):
        def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
            return False

    return SecurityPolicyFactory(SecurityPolicyNone, ua.MessageSecurityMode.None_, permission_ruleset=Nothing())


@dataclass
class _Camera:
    """One camera's nodes and what was last written to them."""

    epoch: int
    folder: Any  # its Node
    tracked: bool
    written: dict[str, Any] = field(default_factory=dict)  # NodeId string -> value last written
    classes: set[str] = field(default_factory=set)  # ObjectsByClass variables made
    tally: ObjectTally = field(default_factory=ObjectTally)  # its objects (camera_tags.py, as Sparkplug's)


class OpcUaServer:
    """The address space above, kept up to date from the core, in a thread with its own asyncio loop.

    `streams()`: the registered streams (core.streams()); `status()`: the server's status word; `names(result)`:
    the class names of the model that produced a result; `class_names(stream)`: the classes a tracked camera counts
    (ObjectsByClass made for each at once); `subscribe(loop)`: a fan-out subscription of every camera's results read
    on `loop`; `on_sessions(n)`: sessions open now (metrics)."""

    def __init__(self, options: OpcUaOptions, streams: Callable[[], list[Any]], status: Callable[[], str],
                 names: Callable[[FrameResult], dict[int, str]], class_names: Callable[[Any], list[str]],
                 subscribe: Callable[[asyncio.AbstractEventLoop], Subscription],
                 on_sessions: Callable[[int], None] = lambda n: None) -> None:
        self.options = options
        self._identity = load_identity(options) if options.secure else None
        self._uri = self._identity.uri if self._identity is not None else None  # fixed at start
        self._trust = load_trust(options.trust) if options.trust else None
        self._users = load_users(options.users) if options.users else None
        self._lock = threading.Lock()  # a reload's identity against the server being set up
        self._streams, self._status, self._names, self._class_names = streams, status, names, class_names
        self._subscribe, self._on_sessions = subscribe, on_sessions
        self._cameras: dict[str, _Camera] = {}
        self._clash: set[str] = set()  # cameras whose NodeIds another camera's hold: tried again when one goes
        self._warned: set[str] = set()  # ... and said so (once a camera id)
        self._written: dict[str, Any] = {}  # server-level NodeId -> value last written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="opcua", daemon=True)
        self._server: Any = None
        self._ns = 0
        self.results = 0  # results looked at (bench/opcua.py waits for its own to be)

    @property
    def endpoint(self) -> str:
        host, port = self.options.address
        return f"opc.tcp://{host}:{port}"

    def start(self) -> None:
        """Begin in the background: the address space is built and the port bound in the OPC UA thread (asyncua
        takes ~3 s to build its standard nodes on a 2-core VM), while the engines load. `wait_started` says how it
        went."""
        self._thread.start()

    def reloads(self) -> list[tuple[str, Callable[[], None]]]:
        """What SIGHUP reads again, each (what, action) on its own for security.py's reload: an action raises
        ConfigError, which is logged there, when its files cannot be used, and what is in use stays."""
        actions: list[tuple[str, Callable[[], None]]] = []
        if self.options.secure:
            actions.append(("OPC UA certificate", self.reload_identity))
        if self.options.trust:
            actions.append(("OPC UA trust list", self.reload_trust))
        if self.options.users:
            actions.append(("OPC UA users", self.reload_users))
        return actions

    def reload_identity(self) -> None:
        """--opcua-cert and --opcua-key read again and checked: new secure channels and GetEndpoints get them, open
        sessions keep theirs. ConfigError (a half-written file, a key of another certificate, another application
        URI) leaves the ones in use."""
        identity = load_identity(self.options)
        if identity.uri != self._uri:
            raise ConfigError(f"--opcua-cert {self.options.cert} names the application URI {identity.uri}, not "
                              f"{self._uri} as the server's at start did (clients know the server by it: a new "
                              "URI needs a restart)")
        with self._lock:
            self._identity = identity
            loop = self._loop if self._server is not None else None  # not yet: the start hands it over
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(self._use_identity)
        log.info("opcua: certificate reloaded from %s (%s, valid until %s): new sessions get it, open ones keep "
                 "theirs", self.options.cert, identity.cert.subject.rfc4514_string(),
                 f"{identity.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")

    def reload_trust(self) -> None:
        """--opcua-trust read again: new sessions are checked against it. ConfigError leaves the one in use."""
        assert self.options.trust is not None
        self._trust = load_trust(self.options.trust)
        log.info("opcua: trust list reloaded from %s: %d certificates and CAs, for new sessions", self.options.trust,
                 len(self._trust))

    def reload_users(self) -> None:
        """--opcua-users read again: new sessions log in with its users (open ones stay). ConfigError leaves the
        ones in use."""
        assert self.options.users is not None
        self._users = load_users(self.options.users)
        log.info("opcua: users reloaded from %s: %d, for new sessions (open ones stay)", self.options.users,
                 len(self._users))

    def wait_started(self, timeout: float = 60.0) -> None:
        """Block until the server listens; OSError (a port in use) or ConfigError when it cannot."""
        if not self._started.wait(timeout):
            raise ConfigError(f"--opcua {self.endpoint}: the OPC UA server did not start within {timeout:.0f} s")
        if self._error is not None:
            raise self._error

    def close(self, timeout: float = 3.0) -> None:
        """Stop serving (clients see the connection close) and end the thread, within `timeout` seconds."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------- own thread
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # a start failure reaches wait_started; a later one is logged
            if not self._started.is_set():
                self._error = e
                self._started.set()
            else:
                log.exception("opcua: the OPC UA server stopped")

    async def _serve(self) -> None:
        from asyncua import Server, ua

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._sync_lock = asyncio.Lock()  # the ticks and the results both make cameras' nodes: one at a time
        for name in ("asyncua", "asyncuagds"):  # its own lines (every session opened, closed) stay quiet
            logging.getLogger(name).setLevel(logging.ERROR)
        # a refused request (a client trying to write) is an ERROR line there, each time, and a port in use a
        # traceback: ours say what matters
        logging.getLogger("asyncua.server.uaprocessor").setLevel(logging.CRITICAL)
        logging.getLogger("asyncua.server.server").setLevel(logging.CRITICAL)
        server = Server(user_manager=_user_manager(lambda: self._users) if self.options.users else None)
        await server.init()
        host, port = self.options.address
        server.set_endpoint(f"opc.tcp://{host}:{port}")
        server.set_server_name("yolov12-serve")
        server.product_uri = NAMESPACE
        server.manufacturer_name = "yolov12-serve"
        server.application_type = ua.ApplicationType.Server
        server.allow_remote_admin(False)
        # with users, only UserName is offered (and accepted): an anonymous session is refused BadIdentityTokenRejected
        server.set_identity_tokens([ua.UserNameIdentityToken if self.options.users else ua.AnonymousIdentityToken])
        rules = _read_only_rules()
        if self._identity is not None:
            server.iserver.certificate, server.iserver.private_key = self._identity.cert, self._identity.key
            await server.set_application_uri(self._identity.uri)
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                                        ua.SecurityPolicyType.Basic256Sha256_Sign], permission_ruleset=rules)
            if self._trust is not None:
                server.set_certificate_validator(_client_validator(lambda: self._trust))
            # before start(): it appends the Basic256Sha256 policies to this list and hands it to the listener (a
            # None channel takes the first policy that matches it: this one, not asyncua's unchecked default)
            server._policies.append(_refuse_unencrypted())
        else:
            await server.set_application_uri(f"urn:{socket.gethostname()}:yolov12-serve")
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity], permission_ruleset=rules)
        self._ns = await server.register_namespace(NAMESPACE)
        root = await server.nodes.objects.add_object(self._id("Yolov12Serve"), self._name("Yolov12Serve"))
        await root.add_variable(self._id("Yolov12Serve.Status"), self._name("Status"), self._status(),
                                varianttype=ua.VariantType.String)
        self._cameras_folder = await root.add_folder(self._id("Cameras"), self._name("Cameras"))
        try:
            await server.start()
        except OSError as e:
            why = "the port is in use" if "in use" in str(e) else (e.strerror or str(e))
            raise OSError(f"cannot listen for OPC UA on {host}:{port}: {why}; pick another port in --opcua") from None
        with self._lock:
            self._server = server
        if self._identity is not None:
            self._use_identity()  # one reloaded while the server was set up
        sub = self._subscribe(self._loop)
        self._started.set()
        security = ("Basic256Sha256 (Sign, SignAndEncrypt), " + ("clients in --opcua-trust" if self._trust else
                    "any client certificate") if self._identity is not None else "unencrypted (security None)")
        if self._users is not None:
            security += f", {len(self._users)} users of --opcua-users (no anonymous sessions)"
        log.info("opcua: serving on %s, namespace %s, %s", self.endpoint, NAMESPACE, security)
        pump = asyncio.create_task(self._pump(sub))
        try:
            await self._ticks()
        finally:
            sub.close()
            pump.cancel()
            await server.stop()

    def _use_identity(self) -> None:
        """The certificate and key in use handed to asyncua (in its loop): to the policy factories each new secure
        channel's security is made from (asyncua's private Server._policies, the list its listener holds; a channel
        open keeps its own), to its own copy (CreateSession signs with it, a password is encrypted to it) and to the
        endpoint descriptions GetEndpoints answers with, which hold the certificate a client then encrypts to."""
        from asyncua.crypto.security_policies import SecurityPolicyNone
        from cryptography.hazmat.primitives.serialization import Encoding

        with self._lock:
            identity, server = self._identity, self._server
        assert identity is not None and server is not None
        iserver = server.iserver
        if iserver.certificate is identity.cert:
            return
        iserver.certificate, iserver.private_key = identity.cert, identity.key
        for factory in server._policies:
            if factory.cls is not SecurityPolicyNone:
                factory.certificate, factory.private_key = identity.cert, identity.key
        der = identity.cert.public_bytes(Encoding.DER)
        for endpoint in iserver.endpoints:
            endpoint.ServerCertificate = der

    def _id(self, name: str) -> Any:
        from asyncua import ua

        return ua.NodeId(name, self._ns)

    def _name(self, name: str) -> Any:
        from asyncua import ua

        return ua.QualifiedName(name, self._ns)

    async def _ticks(self) -> None:
        assert self._stop is not None
        next_rates = 0.0
        while not self._stop.is_set():
            rates = time.monotonic() >= next_rates
            if rates:
                next_rates = time.monotonic() + RATES_EVERY_S
            try:
                await self._tick(rates)
            except Exception:  # a bug here must not end the server for good
                log.exception("opcua: the address space could not be updated")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), TICK_S)

    async def _tick(self, rates: bool) -> None:
        from asyncua import ua
        from asyncua.server.internal_session import InternalSession

        await self._write(self._written, "Yolov12Serve.Status", self._status(), ua.VariantType.String)
        streams = await self._sync_cameras()
        for s in streams:
            cam = self._cameras.get(s.stream_id)
            if cam is None or cam.epoch != s.epoch:
                continue
            base = f"Cameras.{s.stream_id}."
            values = camera_states(s)  # camera_tags.py: the values Sparkplug B shows too
            values["Reconnects"] = min(values["Reconnects"], 2**32 - 1)
            if rates:
                values.update(camera_rates(s))
            for name, value in values.items():
                await self._write(cam.written, base + name, value, getattr(ua.VariantType, _KINDS[name]))
        # asyncua's own count of activated sessions (one server per process)
        self._on_sessions(getattr(InternalSession, "_current_connections", 0))

    async def _write(self, cache: dict[str, Any], node: str, value: Any, kind: Any) -> None:
        """Write `value` to the variable `node` when it differs from what was last written there."""
        from asyncua import ua

        if cache.get(node, _UNSET) == value:
            return
        cache[node] = value
        await self._server.write_attribute_value(self._id(node), ua.DataValue(ua.Variant(value, kind)))

    async def _sync_cameras(self) -> list[Any]:
        """Nodes made for cameras added, deleted for those removed (and remade for an id added again); returns the
        streams now."""
        async with self._sync_lock:
            return await self._sync_cameras_locked()

    async def _sync_cameras_locked(self) -> list[Any]:
        streams = self._streams()
        now = {s.stream_id: s for s in streams}
        gone = [sid for sid, cam in self._cameras.items() if sid not in now or now[sid].epoch != cam.epoch]
        for sid in gone:
            await self._server.delete_nodes([self._cameras.pop(sid).folder], recursive=True)
        self._clash = set() if gone else self._clash & set(now)  # a camera gone may free their NodeIds: tried again
        for sid, s in now.items():
            if sid not in self._cameras and sid not in self._clash:
                await self._add_camera(s)
        return streams

    async def _add_camera(self, s: Any) -> None:
        from asyncua import ua

        sid, base = s.stream_id, f"Cameras.{s.stream_id}"
        tracked = s.tracker is not None
        try:
            folder = await self._cameras_folder.add_object(self._id(base), self._name(sid))
        except ua.UaStatusCodeError:  # 'a.State' and camera 'a': the NodeId is the other camera's variable
            self._clash_said(sid, base)
            return
        cam = _Camera(s.epoch, folder, tracked)
        try:
            await self._add_variables(s, cam, folder, base)
        except ua.UaStatusCodeError:  # camera 'a' after 'a.State': its State variable is the other's folder
            await self._server.delete_nodes([folder], recursive=True)
            self._clash_said(sid, base)
            return
        self._cameras[sid] = cam

    def _clash_said(self, sid: str, base: str) -> None:
        self._clash.add(sid)
        if sid not in self._warned:
            self._warned.add(sid)
            log.warning("opcua: camera %s has no OPC UA nodes: their NodeIds (%s...) are another camera's; give it an "
                        "id that is not another's with a dot and a variable name added", sid, base)

    async def _add_variables(self, s: Any, cam: _Camera, folder: Any, base: str) -> None:
        from asyncua import ua

        for name, kind, value in (("State", ua.VariantType.String, s.state.name),
                                  ("Streaming", ua.VariantType.Boolean, s.state.name == "STREAMING"),
                                  ("Fps", ua.VariantType.Float, 0.0),
                                  ("LatencyP99Ms", ua.VariantType.Float, 0.0),
                                  ("Reconnects", ua.VariantType.UInt32, 0),
                                  ("PictureProblem", ua.VariantType.String, ""),
                                  ("LastError", ua.VariantType.String, "")):
            await folder.add_variable(self._id(f"{base}.{name}"), self._name(name), value, varianttype=kind)
            cam.written[f"{base}.{name}"] = value
        if not cam.tracked:
            return
        await folder.add_variable(self._id(f"{base}.Objects"), self._name("Objects"), 0,
                                  varianttype=ua.VariantType.UInt64)
        await folder.add_folder(self._id(f"{base}.ObjectsByClass"), self._name("ObjectsByClass"))
        last = await folder.add_object(self._id(f"{base}.LastObject"), self._name("LastObject"))
        for name, kind, value in (("Class", ua.VariantType.String, ""), ("Score", ua.VariantType.Float, 0.0),
                                  ("TrackId", ua.VariantType.UInt64, 0),
                                  ("CaptureTime", ua.VariantType.DateTime, _NO_TIME)):
            await last.add_variable(self._id(f"{base}.LastObject.{name}"), self._name(name), value, varianttype=kind)
        for name in self._class_names(s):
            await self._add_class(cam, s.stream_id, name)

    async def _add_class(self, cam: _Camera, sid: str, name: str) -> None:
        from asyncua import ua

        node = f"Cameras.{sid}.ObjectsByClass.{name}"
        folder = self._server.get_node(self._id(f"Cameras.{sid}.ObjectsByClass"))
        await folder.add_variable(self._id(node), self._name(name), 0, varianttype=ua.VariantType.UInt64)
        cam.classes.add(name)

    async def _pump(self, sub: Subscription) -> None:
        while True:
            batch = await sub.next_batch()
            if batch is None:
                return
            for result in batch[0]:
                self.results += 1
                if result.track_ids is None or result.error or not len(result.track_ids):
                    continue  # the cost of an untracked camera's result: this look
                try:
                    await self._objects(result)
                except Exception:  # a bug here must not end the counting for good
                    log.exception("opcua: a result of %s could not be counted", result.stream_id)

    async def _objects(self, result: FrameResult) -> None:
        """The objects a tracked camera's result sees first: counted, and the last one shown (the same objects as
        yolov12_objects_total and MQTT's objects topic)."""
        from asyncua import ua

        cam = self._cameras.get(result.stream_id)
        if cam is None and result.stream_id in self._clash:  # no nodes of its own (said once)
            return
        if cam is None or cam.epoch != result.epoch:  # added since the last tick: its nodes made now
            await self._sync_cameras()
            cam = self._cameras.get(result.stream_id)
            if cam is None or cam.epoch != result.epoch or not cam.tracked:
                return
        tally = cam.tally
        new = tally.count(result, self._names)
        if not new or tally.last is None:
            return
        base = f"Cameras.{result.stream_id}"
        for name in dict.fromkeys(new):
            if name not in cam.classes:
                await self._add_class(cam, result.stream_id, name)
            await self._write(cam.written, f"{base}.ObjectsByClass.{name}", tally.by_class[name],
                              ua.VariantType.UInt64)
        last, obj = f"{base}.LastObject.", tally.last
        await self._write(cam.written, last + "Class", obj.class_name, ua.VariantType.String)
        await self._write(cam.written, last + "Score", obj.score, ua.VariantType.Float)
        await self._write(cam.written, last + "CaptureTime", dt.datetime.fromtimestamp(obj.capture_time_s,
                          dt.timezone.utc), ua.VariantType.DateTime)
        await self._write(cam.written, last + "TrackId", obj.track_id, ua.VariantType.UInt64)  # last: the one to watch
        await self._write(cam.written, f"{base}.Objects", tally.objects, ua.VariantType.UInt64)


_UNSET = object()
_KINDS = {"State": "String", "Streaming": "Boolean", "Reconnects": "UInt32", "PictureProblem": "String",
          "LastError": "String", "Fps": "Float", "LatencyP99Ms": "Float"}  # camera_tags' values: their OPC UA types
