"""RTSP redirects held to the camera host policy (--allow-hosts and the refusals every server makes).

FFmpeg's RTSP client follows a 3xx answer to whatever host its Location names (libavformat/rtsp.c; no option
turns that off), so a camera, or whoever answers at its address, could send the server on to a host the policy
refuses (a cloud's metadata service, a port scan of the plant network): the host was checked, and pinned, only
for the first connection. FFmpeg logs each redirect ("Status 302: Redirecting to URL") in the thread that opens
the camera, before it connects. `checked(policy)` wraps an `av.open`: a handler on PyAV's log checks that URL
with the policy; a refused one interrupts the open in this thread (interrupts.py), so FFmpeg gives up after the
TCP connection and before its first request (no byte reaches that host), and the caller fails the camera for good
instead of retrying. Should a PyAV release not let the open be interrupted, the refusal still ends the open once
it returns: one request, no retries.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from ..allowlist import CameraPolicy
from ..errors import ServerError
from . import interrupts

__all__ = ["checked"]

_REDIRECT = "Redirecting to "
_local = threading.local()  # per opening thread: .policy (CameraPolicy | None), .refused ((url, why) | None)
_installed = False
_install_lock = threading.Lock()


class _Handler(logging.Handler):
    """Sees FFmpeg's log lines in the thread that wrote them; checks a redirect's target during a `checked` open."""

    def emit(self, record: logging.LogRecord) -> None:
        policy = getattr(_local, "policy", None)
        if policy is None:
            return
        message = record.getMessage()
        at = message.find(_REDIRECT)
        if at < 0 or getattr(_local, "refused", None) is not None:
            return
        url = message[at + len(_REDIRECT):].strip()
        from ..config import url_kind

        try:
            policy.check(url, url_kind(url))
        except ServerError as e:
            _local.refused = (url, str(e))
            interrupts.interrupt_this_thread(True)


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        import av.logging

        logger = logging.getLogger("libav")  # FFmpeg's lines stay out of the server's log, as before
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(_Handler())
        av.logging.set_level(av.logging.INFO)  # redirects are logged at INFO
        interrupts.install()
        _installed = True


@contextlib.contextmanager
def checked(policy: CameraPolicy | None) -> Iterator[Callable[[], tuple[str, str] | None]]:
    """Around an `av.open` in this thread: yields a function that returns (target URL, why) when the camera
    redirected to a host `policy` refuses (the open was then interrupted), else None. No policy: no check."""
    if policy is None:
        yield lambda: None
        return
    _install()
    _local.policy, _local.refused = policy, None
    try:
        yield lambda: _local.refused
    finally:
        _local.policy = _local.refused = None
        interrupts.interrupt_this_thread(False)  # this thread's reads run as usual again
