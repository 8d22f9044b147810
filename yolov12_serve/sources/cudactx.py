"""A GPU's primary CUDA context, made current on the calling thread through the driver API (ctypes on libcuda).

FFmpeg's CUDA device can decode in the context current on the thread that creates it (`current_ctx=1`).
Handing it the device's primary context (the one PyTorch and ONNX Runtime use) keeps decoding and inference
in one context: no context per stream, no time-slicing between contexts. (Its other option, `primary_ctx=1`,
refuses a primary context that is already active with other scheduling flags, which is the case as soon as
an engine ran on the GPU.) No torch, no CUDA toolkit: only the driver library.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["CudaDriverError", "make_current"]


class CudaDriverError(RuntimeError):
    """No CUDA driver here, or a driver call failed (the message names the call and the CUDA error)."""


class _Driver:
    """The few driver calls needed, with each GPU's primary context retained once for the process's life."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaDriverError(f"no CUDA driver (libcuda.so.1: {e})") from None
        self._check(self.lib.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(name))
            raise CudaDriverError(f"{call} failed: {(name.value or b'').decode() or status}")

    def primary_context(self, gpu: int) -> ctypes.c_void_p:
        with self._lock:
            if gpu not in self._contexts:
                device, context = ctypes.c_int(), ctypes.c_void_p()
                self._check(self.lib.cuDeviceGet(ctypes.byref(device), gpu), f"cuDeviceGet({gpu})")
                self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device),
                            f"cuDevicePrimaryCtxRetain(GPU {gpu})")
                self._contexts[gpu] = context
            return self._contexts[gpu]

    def make_current(self, gpu: int) -> None:
        self._check(self.lib.cuCtxSetCurrent(self.primary_context(gpu)), f"cuCtxSetCurrent(GPU {gpu})")


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def make_current(gpu: int) -> None:
    """Make GPU `gpu`'s primary context current on this thread (CUDA_VISIBLE_DEVICES numbering, as PyTorch's);
    CudaDriverError when there is no driver or no such GPU."""
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = _Driver()
    _driver.make_current(gpu)
