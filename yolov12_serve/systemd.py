"""systemd's notify protocol (sd_notify), spoken by the server's main process without libsystemd.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET`, a unix datagram socket (a path, or '@name' in the abstract
namespace); each datagram is newline-separated `KEY=VALUE` lines. The server says:

- `READY=1` with `MAINPID=` and a `STATUS=` line once it really serves: gRPC bound, engines warm, the cameras of
  the command line and the state folder back, health SERVING (app.py);
- `STATUS=` when what it serves changes ("serving 5 cameras on 2 devices ...", "draining"): `systemctl status`;
- `RELOADING=1` with `MONOTONIC_USEC=` on SIGHUP, and `READY=1` once certificates, tokens and engines are read
  again (what `Type=notify-reload`, systemd 253+, expects; with `Type=notify` it shows as "reloading");
- `STOPPING=1` when SIGTERM starts the drain;
- `WATCHDOG=1` every `$WATCHDOG_USEC`/2 (when `$WATCHDOG_PID` is unset or this process's pid): see `Watchdog`.

`Notifier.from_environment()` takes the variables out of `os.environ`, so that the device processes
(`--gpus cpu:2`, multiprocessing spawn), FFmpeg and anything else started later do not inherit them: only the main
process notifies (and the unit says `NotifyAccess=main`). Without `$NOTIFY_SOCKET` every call does nothing. A
socket that is gone or full is logged once and never fails the server.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

__all__ = ["Notifier", "monotonic_usec"]

log = logging.getLogger(__name__)

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC=` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Datagrams to systemd's notify socket; every method is a no-op when there is none."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """`address`: $NOTIFY_SOCKET as systemd gives it (None: off); `watchdog_usec`: the watchdog period when
        this process is the one watched (None: no watchdog)."""
        self.address = address or None
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
        self._target: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._complained = False
        if self.address is None:
            return
        if self.address.startswith("@"):  # the abstract namespace: a leading NUL byte
            self._target = b"\0" + self.address[1:].encode()
        elif self.address.startswith("/"):
            self._target = self.address
        else:  # vsock:... (a VM's host) and anything newer: not spoken here
            log.warning("NOTIFY_SOCKET=%s: only unix socket paths and '@' abstract names are supported; systemd "
                        "will not be told when the server is ready", self.address)
            self.address = None
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)  # a full queue drops the datagram: never stall the event loop

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Notifier:
        """Read and remove $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (os.environ by default): the
        processes this one starts later do not see them."""
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, None) for name in ENV_VARS}
        watchdog: int | None = None
        usec, pid = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
        if usec:
            try:
                watchdog = int(usec) if int(usec) > 0 else None
                if pid and int(pid) != os.getpid():  # the watchdog is another process's (a wrapper's)
                    watchdog = None
            except ValueError:
                log.warning("WATCHDOG_USEC=%s / WATCHDOG_PID=%s: not numbers, no watchdog pings", usec, pid)
                watchdog = None
        return cls(values["NOTIFY_SOCKET"], watchdog)

    @property
    def enabled(self) -> bool:
        """Whether there is a notify socket to talk to."""
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; True when it was sent. A failure is logged once, then quiet."""
        sock, target = self._sock, self._target
        if sock is None or target is None:
            return False
        data = "\n".join(line.replace("\n", " ") for line in lines).encode()
        with self._lock:
            try:
                sock.sendto(data, target)
                return True
            except OSError as e:  # gone (ENOENT, ECONNREFUSED), full (EAGAIN), or not ours to write (EACCES)
                if not self._complained:
                    self._complained = True
                    log.warning("systemd notify socket %s: %s; the server runs on, systemd is not told (this is "
                                "said once)", self.address, e.strerror or e)
                return False

    def ready(self, status: str) -> bool:
        """Start-up (or a reload) is complete."""
        return self.notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")

    def reloading(self, status: str = "reloading") -> bool:
        """A reload begins; `ready()` says when it is done."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", f"STATUS={status}")

    def stopping(self, status: str = "draining") -> bool:
        """The drain begins."""
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """What `systemctl status` shows on its Status: line."""
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        """One keep-alive ping (only where a watchdog period was given)."""
        return self.watchdog_s is not None and self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
