"""Area attention (YOLOv12's A2 module) and the R-ELAN block built from it.

The token sequence (H*W, row-major) is cut into `area` contiguous chunks (horizontal
stripes) that attend within themselves, batched as B*area. On GPUs attention runs through
`torch.nn.functional.scaled_dot_product_attention` (FlashAttention-2 kernels on supported
GPUs, no extra package); the `flash-attn` package is used on CUDA when it is importable
and the GPU supports it, never required. On CPU and in ONNX export the plain
softmax(q k^T) v is used: SDPA's CPU fallback adds safe-softmax masking ops (all, where,
isneginf) that cost about 6% of a yolov12n forward, and exports to a larger graph.

Two released variants differ only in the projections:
- turbo (official repository default): `qk` 1x1 C->2C, `v` 1x1 C->C, 5x5 depthwise `pe` on v.
- v1 (paper, = ultralytics yolo12): one `qkv` 1x1 C->3C interleaved per head, 7x7 depthwise `pe`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import C3k
from .conv import Conv

__all__ = ["A2C2f", "AAttn", "AAttnV1", "ABlock", "attention", "attention_backend", "explicit_attention"]


@functools.cache
def _flash_attn_func():
    """The flash-attn package's kernel, or None when it is not installed (it is optional)."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return None
    return flash_attn_func


def _flash_attn_usable(q: torch.Tensor) -> bool:
    if not q.is_cuda or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or q.shape[-1] > 256:
        return False
    if _flash_attn_func() is None:
        return False
    major, _ = torch.cuda.get_device_capability(q.device)
    return major >= 8  # Ampere or newer


def attention_backend(device: torch.device | str = "cpu") -> str:
    """Name of the kernel `attention` uses on `device`: 'flash-attn', 'sdpa' (CUDA) or 'math' (CPU)."""
    probe = torch.empty(1, 1, 1, 32, device=device)
    if _flash_attn_usable(probe):
        return "flash-attn"
    return "sdpa" if probe.is_cuda else "math"


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out (the CPU and export path)."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v on [B, heads, N, d] tensors, with the fastest kernel for the device."""
    if _flash_attn_usable(q):
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float16
        out = _flash_attn_func()(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)))
        return out.transpose(1, 2).to(q.dtype)
    if q.is_cuda and not torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v)
    return explicit_attention(q, k, v)


def _split_areas(t: torch.Tensor, area: int) -> torch.Tensor:
    """[B, C, H, W] map -> [B*area, H*W/area, C] token chunks (row-major stripes)."""
    b, c, h, w = t.shape
    return t.flatten(2).transpose(1, 2).reshape(b * area, h * w // area, c)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, heads, N, C/heads] (channel = head * head_dim + d)."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """[B*area, heads, N/area, d] attention output -> [B, C, H, W] map (one copy)."""
    return t.permute(0, 1, 3, 2).reshape(b, -1, h, w) if t.shape[0] == b else \
        t.transpose(1, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


class AAttn(nn.Module):
    """Area attention, turbo variant: separate `qk` and `v` projections, 5x5 depthwise position encoding."""

    def __init__(self, dim: int, num_heads: int, area: int = 1) -> None:
        super().__init__()
        self.area, self.num_heads = area, num_heads
        self.qk = Conv(dim, dim * 2, 1, act=False)
        self.v = Conv(dim, dim, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 5, 1, 2, g=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        area = self.area if self.area > 1 else 1
        v_map = self.v(x)
        q, k = _split_areas(self.qk(x), area).split(c, dim=2)
        v = _split_areas(v_map, area)
        out = attention(_heads(q, self.num_heads), _heads(k, self.num_heads), _heads(v, self.num_heads))
        return self.proj(_merge(out, b, h, w) + self.pe(v_map))


class AAttnV1(nn.Module):
    """Area attention, v1 (paper / ultralytics) variant: one `qkv` projection interleaved per head, 7x7 `pe`."""

    def __init__(self, dim: int, num_heads: int, area: int = 1) -> None:
        super().__init__()
        self.area, self.num_heads = area, num_heads
        self.qkv = Conv(dim, dim * 3, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 7, 1, 3, g=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        area = self.area if self.area > 1 else 1
        qkv = _split_areas(self.qkv(x), area)  # [B', N', 3C], channels [q_h | k_h | v_h] per head
        bn, n, _ = qkv.shape
        q, k, v = qkv.view(bn, n, self.num_heads, -1).transpose(1, 2).chunk(3, dim=-1)
        out = attention(q, k, v)
        v_map = _merge(v, b, h, w)
        return self.proj(_merge(out, b, h, w) + self.pe(v_map))


class ABlock(nn.Module):
    """Attention block: x + attn(x), then x + mlp(x) (1x1 conv expand with SiLU, 1x1 back with BN only)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 1.2, area: int = 1,
                 attn: type[nn.Module] = AAttn) -> None:
        super().__init__()
        self.attn = attn(dim, num_heads=num_heads, area=area)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(Conv(dim, hidden, 1), Conv(hidden, dim, 1, act=False))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class A2C2f(nn.Module):
    """R-ELAN: cv1, n chained blocks (pairs of ABlocks, or C3k without attention), cv2 over all of them.

    With `residual` (l/x scales) the output is x + gamma * cv2(...), gamma a per-channel scale from 0.01.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, a2: bool = True, area: int = 1, residual: bool = False,
                 mlp_ratio: float = 2.0, e: float = 0.5, g: int = 1, shortcut: bool = True,
                 attn: type[nn.Module] = AAttn) -> None:
        super().__init__()
        c_ = int(c2 * e)
        if c_ % 32:
            raise ValueError(f"A2C2f hidden width {c_} must be a multiple of 32 (32 channels per head)")
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv((1 + n) * c_, c2, 1)
        self.gamma = nn.Parameter(0.01 * torch.ones(c2)) if a2 and residual else None
        self.m = nn.ModuleList(
            nn.Sequential(*(ABlock(c_, c_ // 32, mlp_ratio, area, attn) for _ in range(2)))
            if a2 else C3k(c_, c_, 2, shortcut, g)
            for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        out = self.cv2(torch.cat(y, 1))
        return x + self.gamma.view(1, -1, 1, 1) * out if self.gamma is not None else out
