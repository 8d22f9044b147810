"""Whether a listening port can be had, asked before gRPC binds it: gRPC logs a multi-line error of its own first."""

from __future__ import annotations

import errno
import socket

__all__ = ["bare_host", "check_bindable", "host_port"]


def bare_host(host: str) -> str:
    """An address as sockets take it: '[::1]' -> '::1' (an IPv6 address written as URLs write it); others as given."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """'HOST:PORT' as gRPC and messages want it: an IPv6 address bracketed ('[::]:50051'), which gRPC cannot tell
    from its port otherwise."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_bindable(address: str, what: str = "gRPC", flag: str = "--port", values: str = "0: any free port") -> None:
    """OSError with the fix when `address` (HOST:PORT, port not 0) cannot be bound, e.g. a port in use; `what` and
    `flag` name the listener and the flag that moves it in the message."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            probe.bind((host, int(port)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why, fix = "the port is in use (another yolov12-serve?)", f"pick another with {flag} ({values})"
        else:
            why, fix = e.strerror or str(e), "check --host (0.0.0.0: every interface of this machine)"
        raise OSError(f"cannot listen for {what} on {address}: {why}; {fix}") from None
