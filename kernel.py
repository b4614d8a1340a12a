"""
Attention for MoA plans at inference: every KV head k keeps the first `sink` tokens plus its W_k most recent ones.
  prefill  -> FlexAttention with a block mask, so whole dropped blocks are skipped (SPEC §10)
  masked_reference -> the same attention as plain masked PyTorch, the reference the fast paths are tested against
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# Compiling FlexAttention costs 10-30 s per shape on a CPU; below this many scores the eager version is faster.
COMPILE_MIN_SCORES = 1 << 22
_flex_compiled = torch.compile(flex_attention, dynamic=False)


def sink_window_mask(windows, sink, group):
    """The SPEC §2 mask as a FlexAttention mask_mod: query i sees key j iff j <= i and (j < sink or i - j < W).
    windows: [G] int tensor, one window per KV head; query head h belongs to KV head h // group."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sink) | (q_idx - kv_idx < windows[h // group]))
    return mask_mod


@functools.lru_cache(maxsize=256)
def _block_mask(windows: tuple, sink: int, heads: int, n: int, device: str):
    w = torch.tensor(windows, device=device)
    mask_mod = sink_window_mask(w, sink, heads // len(windows))
    return create_block_mask(mask_mod, None, heads, n, n, device=device, _compile=device != "cpu")


def prefill(q, k, v, windows, sink, scale=None):
    """Sink + sliding-window attention over a whole sequence through FlexAttention.
    q: [B, H, N, d]; k, v: [B, G, N, d]; windows: sequence of G ints. Returns [B, H, N, d]."""
    B, H, N, d = q.shape
    block_mask = _block_mask(tuple(int(w) for w in windows), int(sink), H, N, str(q.device))
    flex = _flex_compiled if q.is_cuda or H * N * N >= COMPILE_MIN_SCORES else flex_attention
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def masked_reference(q, k, v, windows, sink, scale=None):
    """Plain PyTorch version of `prefill` (float64 if given float64): a dense boolean mask and softmax.
    q: [B, H, N, d]; k, v: [B, G, N, d]; windows: G ints. Returns [B, H, N, d]."""
    B, H, N, d = q.shape
    g = H // k.shape[1]
    i = torch.arange(N, device=q.device)[:, None]
    j = torch.arange(N, device=q.device)[None, :]
    w = torch.as_tensor(list(windows), device=q.device).repeat_interleave(g)[:, None, None]  # [H, 1, 1]
    allowed = (j <= i) & ((j < sink) | (i - j < w))                                          # [H, N, N]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * (scale if scale is not None else d ** -0.5)
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(g, 1)
