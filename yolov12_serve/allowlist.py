"""Where cameras may be: URL schemes and camera hosts the server agrees to connect to (`--allow-hosts`).

The server connects wherever AddStream tells it to, so on a shared network it could be made to reach hosts the
caller cannot (server-side request forgery): above all a cloud's instance-metadata service, which hands out
credentials to whoever asks from the machine. So:

- Schemes: rtsp:// and rtsps:// always; synthetic:// demo cameras only with --allow-synthetic (or --demo: each
  costs up to ~250 MB); files only with --allow-files. Others are INVALID_ARGUMENT.
- Hosts, by default: any host except link-local addresses (169.254.0.0/16, fe80::/10), the unspecified address
  (0.0.0.0, ::) and cloud metadata endpoints (169.254.169.254, fd00:ec2::254, 169.254.170.2, 100.100.100.200,
  metadata.google.internal, ...). With `--allow-hosts 10.1.0.0/16,cam-*.line1.plant,cameras.plant` only hosts in
  those networks or with those names (a leading `*.` or `*` matches any prefix). Metadata addresses stay refused
  unless the list names that exact address. A host outside is PERMISSION_DENIED, with the reason.
- Names are resolved when the stream is added (a name that resolves to a refused address is refused at once; one
  that does not resolve within RESOLVE_TIMEOUT_S is accepted: the camera may be offline, it is retried) and again
  at every connection: `pin()` resolves the name, checks every address and hands FFmpeg the URL with the checked
  address in place of the name, so a name that is re-pointed after the check (DNS rebinding) cannot steer the
  connection to a refused address: the connection fails and is retried instead. Numeric hosts in any spelling
  (`2852039166`, `0xa9fea9fe`, `::ffff:169.254.169.254`) are read as the address they mean.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError, InvalidArgumentError, PermissionDeniedError
from .urls import redact_url

__all__ = ["METADATA_ADDRESSES", "METADATA_NAMES", "RESOLVE_TIMEOUT_S", "CameraPolicy", "HostRefusedError"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT_S = 2.0
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle ...
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.169.253",  # AWS DNS resolver / time (link-local too)
    "fd00:ec2::254",  # AWS IPv6 metadata
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud (classic)
))
METADATA_NAMES = frozenset(("metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.internal"))
_REFUSED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("169.254.0.0/16"), "a link-local address"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address"),
    (ipaddress.ip_network("0.0.0.0/32"), "the unspecified address"),
    (ipaddress.ip_network("::/128"), "the unspecified address"),
)

Resolver = Callable[[str], list[str]]  # host name -> its addresses (OSError when it does not resolve)
_resolver_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


class HostRefusedError(ConnectionError):
    """At connect time, the camera's host resolved to an address outside the policy (retried like a refusal)."""


def system_resolve(host: str) -> list[str]:
    """Every address `host` resolves to (getaddrinfo: /etc/hosts, DNS, ...)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})


def _numeric(host: str) -> IPAddress | None:
    """The address a numeric host means in any spelling inet_aton knows (`2852039166`, `0xa9.0xfe.0xa9.0xfe`,
    `169.254.43518`) or IPv6; None for a name."""
    bare = host.split("%", 1)[0]  # an IPv6 zone: fe80::1%eth0
    try:
        return _unmap(ipaddress.ip_address(bare))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class _Name:
    pattern: str  # lower case, no trailing dot; '*.x' / '*x' match any prefix

    def matches(self, host: str) -> bool:
        if self.pattern.startswith("*"):
            return host.endswith(self.pattern[1:]) and host != self.pattern[1:].lstrip(".")
        return host == self.pattern


class CameraPolicy:
    """Which camera URLs the server accepts (`check`) and the address it connects to for each (`pin`)."""

    def __init__(self, allow_hosts: Iterable[str] = (), allow_synthetic: bool = False, allow_files: bool = False,
                 resolve: Resolver = system_resolve, resolve_timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
        self.allow_synthetic = allow_synthetic
        self.allow_files = allow_files
        self.networks: list[IPNetwork] = []
        self.names: list[_Name] = []
        self.resolve = resolve
        self.resolve_timeout_s = resolve_timeout_s
        for raw in allow_hosts:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or not all(c.isalnum() or c in "-.*_" for c in entry) or "*" in entry[1:]:
                raise ConfigError(f"--allow-hosts: {raw.strip()!r} is neither a network (10.1.0.0/16, 10.1.2.3, "
                                  "fd00::/8) nor a host name (cam1.plant, *.line1.plant)")
            self.names.append(_Name(entry))

    @classmethod
    def parse(cls, allow_hosts: str | None, **kw) -> CameraPolicy:
        """From the --allow-hosts text: comma-separated networks and names (None or '': the default policy)."""
        return cls([e for e in (allow_hosts or "").split(",") if e.strip()], **kw)

    @property
    def restricted(self) -> bool:
        """True when --allow-hosts lists the only hosts allowed."""
        return bool(self.networks or self.names)

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"only {self._allowed()}" if self.restricted else "any host but link-local and cloud metadata addresses"

    def _allowed(self) -> str:
        return ", ".join([str(n) for n in self.networks] + [n.pattern for n in self.names])

    # ------------------------------------------------------------------------------------------------ checks
    def check(self, url: str, kind: str) -> None:
        """Refuse `url` (already classified by config.url_kind as `kind`) unless its scheme and host are allowed:
        InvalidArgumentError for a scheme that is off, PermissionDeniedError for a host outside the policy."""
        if kind == "synthetic" and not self.allow_synthetic:
            raise InvalidArgumentError("synthetic:// demo cameras are off on this server: start it with "
                                       "--allow-synthetic (or --demo) to accept them")
        if kind == "file" and not self.allow_files:
            raise InvalidArgumentError("file sources are disabled (start the server with --allow-files)")
        if kind != "rtsp":
            return
        host = self._host(url)
        addr = _numeric(host)
        if addr is not None:
            self._check_address(url, host, addr, named=False)
            return
        named = self._check_name(url, host)
        try:
            addrs = _resolver_pool.submit(self.resolve, host).result(self.resolve_timeout_s)
        except (OSError, UnicodeError, concurrent.futures.TimeoutError):
            return  # unknown now: the camera may be offline; every connection checks again (pin)
        self._check_addresses(url, host, addrs, named)

    def pin(self, url: str) -> str:
        """The URL to connect to now: `url` with a host name replaced by one of its addresses, each checked
        (HostRefusedError when one is refused, OSError when the name does not resolve). Called by the camera's
        thread before every connection attempt."""
        host = self._host(url)
        addr = _numeric(host)
        if addr is not None:
            self._refusal_as_connection_error(self._check_address, url, host, addr, False)
            return url
        named = self._refusal_as_connection_error(self._check_name, url, host)
        try:
            addrs = self.resolve(host)
        except (OSError, UnicodeError) as e:
            raise OSError(f"cannot resolve camera host {host}: {getattr(e, 'strerror', None) or e}") from None
        if not addrs:
            raise OSError(f"camera host {host} has no address")
        self._refusal_as_connection_error(self._check_addresses, url, host, addrs, named)
        return _with_host(url, addrs[0])

    @staticmethod
    def _refusal_as_connection_error(fn: Callable, *args):
        try:
            return fn(*args)
        except PermissionDeniedError as e:
            raise HostRefusedError(str(e)) from None

    @staticmethod
    def _host(url: str) -> str:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            host = None
        if not host:
            raise InvalidArgumentError(f"url {redact_url(url)!r} has no host: use rtsp://HOST[:PORT]/PATH")
        return host.rstrip(".").lower()

    def _check_name(self, url: str, host: str) -> bool:
        """True when the allowlist names `host`; PermissionDeniedError for a metadata name or a name outside it."""
        if host in METADATA_NAMES:
            if not any(n.pattern == host for n in self.names):
                raise PermissionDeniedError(f"camera host {host} is a cloud metadata service: refused")
            return True
        named = any(n.matches(host) for n in self.names)
        if self.restricted and not named and not self.networks:
            raise PermissionDeniedError(f"camera host {host} is not in --allow-hosts ({self._allowed()})")
        return named

    def _check_addresses(self, url: str, host: str, addrs: Iterable[str], named: bool) -> None:
        for text in addrs:
            addr = _numeric(text)
            if addr is not None:
                self._check_address(url, host, addr, named)

    def _check_address(self, url: str, host: str, addr: IPAddress, named: bool) -> None:
        shown = host if str(addr) == host.split("%", 1)[0] else f"{host} ({addr})"
        if addr in METADATA_ADDRESSES:
            exact = any(n.num_addresses == 1 and addr in n for n in self.networks)
            if not exact:
                raise PermissionDeniedError(f"camera host {shown} is a cloud metadata address: refused (list the "
                                            "exact address in --allow-hosts if a camera really is there)")
            return
        if self.restricted:
            if named or any(addr in n for n in self.networks):
                return
            raise PermissionDeniedError(f"camera host {shown} is not in --allow-hosts ({self._allowed()})")
        for net, what in _REFUSED_NETWORKS:
            if addr.version == net.version and addr in net:
                raise PermissionDeniedError(f"camera host {shown} is {what}: refused by default (allow it with "
                                            f"--allow-hosts {net})")


def _with_host(url: str, address: str) -> str:
    """`url` with its host (not user-info or port) replaced by `address` (bracketed when IPv6)."""
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):
        port = hostport[hostport.find("]") + 1:]
    else:
        _, colon, p = hostport.rpartition(":")
        port = f":{p}" if colon else ""
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}{sep}{userinfo}{at}{host}{port}{tail}"
