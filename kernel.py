"""
Attention for MoA plans at inference: every KV head k keeps the first `sink` tokens plus its W_k most recent ones.
  SinkRingCache    -> the static per-head sink + ring KV cache, one flat buffer per layer (SPEC §9)
  decode           -> fused Triton split-KV decode over the cache, one query token per sequence (SPEC §10), one
                      custom op to torch.compile, so a compiled decode step (CUDA graphs) captures it whole
  prefill          -> FlexAttention with a block mask, so whole dropped blocks are skipped (SPEC §10)
  masked_reference -> the same attention as plain masked PyTorch, the reference the fast paths are tested against
  plan_attention   -> the attention of a transformers model following a plan (moa.apply_plan), over PlanCache (the
                      cache as a transformers Cache); generate_with_plans: generate's hooks that build and fill it
The decode benchmark is bench/kernel.py.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import os
import sys
import warnings

import torch
import torch.nn.functional as F

# Triton picks compiled or interpreted kernels when it is first imported: with no GPU, interpreted (on the CPU).
# transformers' modeling_utils imports Triton, so on such a machine this module must be imported before them.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise ImportError("this machine has no GPU, so kernel.py runs Triton interpreted, but Triton was imported "
                          "before it (by transformers' modeling_utils): import moa or kernel first, or set "
                          "TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention
from transformers import AttentionInterface  # noqa: E402
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402
from transformers.generation import utils as generation_utils  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

# Compiling FlexAttention costs 10-30 s per shape on a CPU; below this many scores the eager version is faster.
COMPILE_MIN_SCORES = 1 << 22
BLOCK = 128   # FlexAttention's tile: whole BLOCK x BLOCK tiles of a mask are skipped
_flex_compiled = torch.compile(flex_attention)   # static first, dynamic after a new shape: few recompiles
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")   # small shapes, on purpose


def sees(i, j, window, sink):
    """The mask of SPEC §2 on true positions (broadcastable tensors): query i sees key j iff j <= i and (j < sink or
    i - j < window). A negative j (padding, or a cache slot holding nothing) is never seen."""
    return (j >= 0) & (j <= i) & ((j < sink) | (j > i - window))   # not i - j: no int tensor of the mask's size


def sink_window_mask(windows, sink, group, pad=None):
    """`sees` as a FlexAttention mask_mod over a left-padded batch. windows: [G] int tensor, one window per KV head
    (query head h belongs to KV head h // group); pad: [B] int tensor of leading padding tokens per sequence, or
    None. Rows of padding see nothing (FlexAttention returns zeros there)."""
    def mask_mod(b, h, q_idx, kv_idx):
        shift = 0 if pad is None else pad[b]                            # index -> true position
        return sees(q_idx - shift, kv_idx - shift, windows[h // group], sink)
    return mask_mod


@functools.lru_cache(maxsize=256)
def _block_mask(windows: tuple, sink: int, heads: int, n: int, device: str, pad: tuple | None):
    """The BlockMask of sink_window_mask, each BLOCK x BLOCK tile classified from its corner positions instead of
    by evaluating all N^2 pairs: a tile none of whose pairs is allowed is skipped; one all of whose pairs are is
    full (no mask_mod needed); the rest are partial. Costs milliseconds where create_block_mask costs seconds."""
    group = heads // len(windows)
    per_kv, p = torch.tensor(windows, device=device), torch.tensor(pad or (0,), device=device)
    w = per_kv.repeat_interleave(group)[None, :, None, None]                                  # [1, H, 1, 1]
    p = p[:, None, None, None]                                                                # [B, 1, 1, 1]
    start = torch.arange(0, n, BLOCK, device=device)
    i_lo, i_hi = start[:, None], (start + BLOCK - 1).clamp(max=n - 1)[:, None]     # query rows of each tile row
    j_lo, j_hi = start[None, :], (start + BLOCK - 1).clamp(max=n - 1)[None, :]     # key columns of each tile column
    lo = torch.maximum(j_lo, p)                                                    # first key past the padding
    some = (j_hi >= p) & (i_hi >= lo) & ((lo - p < sink) | ((i_lo - j_hi).clamp_min(0) < w))
    every = (j_lo >= p) & (i_lo >= j_hi) & ((j_hi - p < sink) | (i_hi - j_lo < w))

    def kv_blocks(m):   # [B, H, tiles, tiles] bool -> counts [B, H, tiles], indices of the True tiles first
        return m.sum(-1, dtype=torch.int32), m.int().argsort(dim=-1, descending=True, stable=True).int()

    mask_mod = sink_window_mask(per_kv, sink, group, None if pad is None else p.flatten())
    return BlockMask.from_kv_blocks(*kv_blocks(some & ~every), *kv_blocks(every), BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(n, n))


def prefill(q, k, v, windows, sink, scale=None, pad=None):
    """Sink + sliding-window attention over a whole (left-padded) sequence through FlexAttention.
    q: [B, H, N, d]; k, v: [B, G, N, d]; windows: G ints; pad: [B] leading padding tokens or None.
    Returns [B, H, N, d] (zeros at padding queries). On a CPU FlexAttention has no backward: a call that needs
    gradients there (a plain forward pass outside torch.no_grad) runs the masked reference instead (N^2 memory)."""
    if not q.is_cuda and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return masked_reference(q, k, v, windows, sink, scale, pad)
    B, H, N, d = q.shape
    pad = None if pad is None else tuple(pad.tolist())          # a host sync only where a padding is given
    block_mask = _block_mask(tuple(int(w) for w in windows), int(sink), H, N, str(q.device), pad if pad and any(pad)
                             else None)
    flex = _flex_compiled if q.is_cuda or H * N * N >= COMPILE_MIN_SCORES else flex_attention
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def masked_reference(q, k, v, windows, sink, scale=None, pad=None):
    """Plain PyTorch version of `prefill` (float64 if given float64): a dense boolean mask and softmax.
    q: [B, H, N, d]; k, v: [B, G, N, d]; windows: G ints; pad: [B] or None. Returns [B, H, N, d]."""
    B, H, N, d = q.shape
    g = H // k.shape[1]
    shift = 0 if pad is None else pad.to(q.device)[:, None, None, None]                      # [B, 1, 1, 1]
    i = torch.arange(N, device=q.device)[:, None] - shift                                     # true positions
    j = torch.arange(N, device=q.device)[None, :] - shift
    w = torch.as_tensor(list(windows), device=q.device).repeat_interleave(g)[:, None, None]  # [H, 1, 1]
    allowed = sees(i, j, w, sink)                                                              # [B|1, H, N, N]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * (scale if scale is not None else d ** -0.5)
    a = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()     # padding rows: all masked -> zeros
    return a @ v.repeat_interleave(g, 1)


# ----------------------------------------------------------------------------------------------------------------
# The static sink + ring KV cache (SPEC §9)


class SinkRingCache:
    """One layer's KV cache for a plan: KV head k owns `capacities[k]` slots of one flat buffer.
        k, v:     [B, S, d], S = Σ_k C_k; head k's slots are offsets[k] .. offsets[k+1] - 1
        offsets:  [G + 1] int32;  capacity: [G] int32
        pad:      [B] int32, leading padding tokens of each sequence
        length:   [] int32, tokens (padding included) stored so far: the next token has true position length - pad
    Token t of a sequence (t its true position, padding excluded) goes to slot t if t < sink, else to
    sink + (t - sink) mod (C_k - sink): the sink never moves, the rest is a ring holding the latest C_k - sink
    tokens. Keys are stored after RoPE, so nothing is ever re-rotated.
    A decode step reads and advances `length` on the device, so the same step (its kernel launches, a compiled graph,
    a CUDA graph) serves every position: the tensors are allocated once and only ever changed in place, and marked
    as static addresses for torch.compile's CUDA graphs. On the host live only facts a decode step does not change:
    the capacities, the decode kernel's work split, whether a prompt was stored (`prefilled`) and whether any
    sequence is padded (`padded`)."""

    def __init__(self, batch, capacities, head_dim, sink, dtype, device):
        self.capacities = [int(c) for c in capacities]                  # on the host too: no syncs when decoding
        self.capacity = torch.tensor(self.capacities, dtype=torch.int32, device=device)
        self.offsets = F.pad(self.capacity.cumsum(0, dtype=torch.int32), (1, 0))
        self.sink = int(sink)
        self.pad = torch.zeros(batch, dtype=torch.int32, device=device)
        self.length = torch.zeros((), dtype=torch.int32, device=device)
        self.prefilled = self.padded = False
        size = (batch, sum(self.capacities), head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        for t in (self.k, self.v, self.length, self.pad, self.offsets, self.capacity):
            torch._dynamo.mark_static_address(t)   # CUDA graphs read and write them where they are, no copies
        # the decode kernel's work split, from static facts (decode's defaults; the benchmark and tests try others)
        self.block_n = 64 if self.k.is_cuda else 512   # the CPU interpreter pays per operation: fewer, larger blocks
        self.programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if self.k.is_cuda else 1
        self.chunk, self.splits = split_kv(batch, self.capacities, self.block_n, self.programs)

    def rows(self, start, stop):
        """Sequences start .. stop - 1 as a SinkRingCache of views of this one's tensors (its length, which every
        sequence shares, included): a prompt stored through it is stored here."""
        part = copy.copy(self)
        part.k, part.v, part.pad = self.k[start:stop], self.v[start:stop], self.pad[start:stop]
        return part

    def slots(self, pos):
        """Flat slot of true positions pos: [...] -> [..., G] (int64)."""
        return self.offsets[:-1] + ring_slot(pos[..., None].long(), self.capacity, self.sink)

    def prefill(self, key, value, pad=None):
        """Start the cache with a prompt. key, value: [B, G, P, d]; pad: [B] leading padding tokens, or None for none:
        then the slots each token goes to are known on the host (prompt_slots), the prompt is copied in with no sync,
        and later chunks share one mask row."""
        self.prefilled, self.padded = True, pad is not None
        if pad is not None:
            self.pad.copy_(pad)
            self.length.zero_()
            return self.store(key, value)
        B, G, P, d = key.shape
        self.pad.zero_()
        self.length.fill_(P)
        src, slot = prompt_slots(P, tuple(self.capacities), self.sink, str(key.device))
        for cache, new in ((self.k, key), (self.v, value)):
            cache.index_copy_(1, slot, new.reshape(B, G * P, d).index_select(1, src))

    def store(self, key, value):
        """Append P tokens to every sequence. key, value: [B, G, P, d]. Only what the cache keeps is written: the
        sink and each head's latest C_k - sink tokens."""
        B, G, P, _ = key.shape
        pos = self.length + torch.arange(P, device=key.device)[None] - self.pad[:, None]             # [B, P]
        last = (self.length + P - self.pad)[:, None, None]                                          # tokens after
        idx = self.slots(pos.clamp_min(0))                                                          # [B, P, G]
        kept = (pos[..., None] >= 0) & keeps(pos[..., None], last, self.capacity, self.sink)
        b, p, g = kept.nonzero(as_tuple=True)
        self.k[b, idx[b, p, g]] = key[b, g, p]
        self.v[b, idx[b, p, g]] = value[b, g, p]
        self.length.add_(P)

    def positions(self):
        """True position held by every slot [B, S] (int64), -1 where a slot holds nothing yet."""
        slot = torch.arange(self.k.shape[1], device=self.k.device)
        head = torch.searchsorted(self.offsets[1:], slot.to(torch.int32), right=True)                # [S]
        r = slot - self.offsets[head]                                              # slot within its head
        ring = (self.capacity[head] - self.sink).clamp_min(1)
        stored = (self.length - self.pad.long())[:, None]                          # [B, 1] true tokens stored
        latest = r + ring * torch.div(stored - 1 - r, ring, rounding_mode="floor")   # newest position in the slot
        pos = torch.where(r < self.sink, r, latest)                                  # [B, S]
        return torch.where(stored > r, pos, -1)                                      # position r fills it first


def ring_slot(pos, capacity, sink):
    """SPEC §9: the slot, within its head's `capacity` slots, that true position pos >= 0 goes to: the sink never
    moves, the rest is a ring of capacity - sink slots. Broadcasting tensors."""
    return torch.where(pos < sink, pos, sink + (pos - sink) % (capacity - sink).clamp_min(1))


def keeps(pos, last, capacity, sink):
    """Whether a head of `capacity` slots still holds true position pos once `last` tokens are stored: the sink and
    the latest capacity - sink. Broadcasting tensors."""
    return (pos < sink) | (pos >= last - (capacity - sink))


@functools.lru_cache(maxsize=256)
def prompt_slots(P, capacities: tuple, sink, device):
    """Where an unpadded P-token prompt goes in a SinkRingCache of these capacities, found on the host (ring_slot,
    keeps). Returns (src, slot), int64 [M] each: the kept tokens as flat indices h * P + t into
    key.reshape(B, G * P, d), and the flat cache slot each is kept in."""
    capacity = torch.tensor(capacities)
    offsets = capacity.cumsum(0) - capacity
    t = torch.arange(P)[:, None]                                                         # [P, 1] true positions
    t, h = keeps(t, P, capacity, sink).nonzero(as_tuple=True)                            # kept (token, head) pairs
    return (h * P + t).to(device), (offsets[h] + ring_slot(t, capacity[h], sink)).to(device)


def chunk_attention(q, k, v, cache, windows, scale=None):
    """A later prefill chunk: queries attend to what the cache holds plus the chunk itself, under the mask of
    SPEC §2, through SDPA with a boolean mask (one call per KV head); then the chunk is stored.
    q: [B, H, P, d]; k, v: [B, G, P, d], the chunk's keys and values (after RoPE); cache: SinkRingCache holding
    the tokens before the chunk; windows: G ints. Returns [B, H, P, d]."""
    B, H, P, d = q.shape
    G = k.shape[1]
    g = H // G
    rows = slice(None) if cache.padded else slice(1)          # unpadded sequences share one mask row: [1, P, S]
    held = cache.positions()[rows]                                                   # [B|1, S]
    new = (cache.length - cache.pad.long()[:, None] + torch.arange(P, device=q.device))[rows]   # true positions
    out, hi = [], 0
    for h in range(G):
        lo, hi = hi, hi + cache.capacities[h]                          # head h's slots (host ints: no sync)
        # K, V expanded to the g query heads (views), not enable_gqa: with a mask, SDPA then takes its memory-
        # efficient backend; with enable_gqa it took one needing 6x the scratch memory (H100, torch 2.11)
        keys = torch.cat([cache.k[:, lo:hi], k[:, h]], 1)[:, None].expand(-1, g, -1, -1)   # [B, g, C_h + P, d]
        values = torch.cat([cache.v[:, lo:hi], v[:, h]], 1)[:, None].expand(-1, g, -1, -1)
        j = torch.cat([held[:, lo:hi], new], 1)[:, None, None]                       # [B|1, 1, 1, C_h + P]
        i = new[:, None, :, None]                                                     # [B|1, 1, P, 1]
        out.append(F.scaled_dot_product_attention(q[:, h * g:(h + 1) * g], keys, values,
                                                  attn_mask=sees(i, j, int(windows[h]), cache.sink), scale=scale))
    cache.store(k, v)
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------------------------------------------
# Fused decode: store one new token per sequence and attend over its KV head's valid slots (SPEC §9, §10)


@triton.jit
def _decode_kernel(Q, Knew, Vnew, K, V, Out, Lse, Offsets, Capacity, Pad, Length, sink, chunk, splits, qk_scale,
                   stride_qb, stride_nb, stride_kb,
                   G: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                   D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr):
    """Program (kv * splits + split, b): KV head kv of sequence b, slots split*chunk .. +chunk of its valid ones.
    Split 0 also writes the new token into its slot and counts it from registers; every split skips that slot, so
    no program reads a slot while it is being written. Writes the normalised partial output Out[b, kv, split]
    [GROUP, D] (float32) and its log2-sum-exp Lse[b, kv, split] [GROUP]."""
    kv, split, b = tl.program_id(0) // splits, tl.program_id(0) % splits, tl.program_id(1)
    pos = tl.load(Length) - tl.load(Pad + b)                        # the new token's true position
    cap = tl.load(Capacity + kv)
    n = tl.minimum(cap, pos + 1)                                    # slots in use, the new one included
    new = tl.where(pos < sink, pos, sink + (pos - sink) % tl.maximum(cap - sink, 1))   # its slot (SPEC §9)
    base = tl.load(Offsets + kv)
    rows, cols = tl.arange(0, GROUP_PAD), tl.arange(0, D_PAD)
    dims = cols < D
    # the GROUP query heads that share this KV head, padded to a tensor-core tile
    q = tl.load(Q + b * stride_qb + (kv * GROUP + rows)[:, None] * D + cols[None, :],
                mask=(rows < GROUP)[:, None] & dims[None, :], other=0.0)
    k_new = tl.load(Knew + b * stride_nb + kv * D + cols, mask=dims, other=0.0)
    v_new = tl.load(Vnew + b * stride_nb + kv * D + cols, mask=dims, other=0.0)
    first = split == 0
    only_first = cols < D * (1 - split)                             # all true in split 0, all false elsewhere
    tl.store(K + b * stride_kb + (base + new) * D + cols, k_new, mask=only_first)
    tl.store(V + b * stride_kb + (base + new) * D + cols, v_new, mask=only_first)
    # split 0 starts from the new token (score s_new, weight 1), the others from nothing
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale                  # log2 units
    m = tl.where(first, s_new, float("-inf"))
    l = tl.where(first, 1.0, 0.0) + tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.where(first, 1.0, 0.0) * v_new.to(tl.float32)[None, :] + tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    for s0 in range(start, end, BLOCK_N):
        offs = s0 + tl.arange(0, BLOCK_N)
        keep = (offs < end) & (offs != new)
        kv_ptr = b * stride_kb + (base + offs)[:, None] * D + cols[None, :]
        k = tl.load(K + kv_ptr, mask=keep[:, None] & dims[None, :], other=0.0)
        v = tl.load(V + kv_ptr, mask=keep[:, None] & dims[None, :], other=0.0)
        if F32_DOT:   # exact float32 products (not tf32)
            q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)       # a block of only the skipped slot: no NaN
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    part = (b * G + kv) * splits + split
    tl.store(Out + (part * GROUP + rows)[:, None] * D + cols[None, :], acc / tl.where(l > 0, l, 1.0)[:, None],
             mask=(rows < GROUP)[:, None] & dims[None, :])
    tl.store(Lse + part * GROUP + rows, m + tl.log2(l), mask=rows < GROUP)


@triton.jit
def _merge_kernel(Out, Lse, Final, splits, G: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                  D_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (h, b): merge query head h's partial outputs over the splits, weighted by 2^(lse - max lse).
    An empty split has lse = -inf and weight 0; split 0 always holds the new token, so the max is finite."""
    h, b = tl.program_id(0), tl.program_id(1)
    kv, r = h // GROUP, h % GROUP
    cols = tl.arange(0, D_PAD)
    row = (b * G + kv) * splits                                     # first split of (b, kv)
    top = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.load(Lse + (row + s) * GROUP + r, mask=s < splits, other=float("-inf")))
    top_all = tl.max(top, 0)
    num = tl.zeros([D_PAD], tl.float32)
    den = 0.0
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        w = tl.exp2(tl.load(Lse + (row + s) * GROUP + r, mask=s < splits, other=float("-inf")) - top_all)
        o = tl.load(Out + ((row + s) * GROUP + r)[:, None] * D + cols[None, :],
                    mask=(s < splits)[:, None] & (cols < D)[None, :], other=0.0)
        num += tl.sum(w[:, None] * o, 0)
        den += tl.sum(w, 0)
    tl.store(Final + (b * G * GROUP + h) * D + cols, num / den, mask=cols < D)


def split_kv(batch, capacities, block_n, programs):
    """The decode kernel's split-KV layout: each KV head's slots in chunks of `chunk` (a multiple of block_n), sized
    so the batch's slots spread over about `programs` programs; `splits` chunks cover the longest head.
    Returns (chunk, splits)."""
    per_program = -(-batch * sum(capacities) // programs)
    chunk = max(block_n, -(-per_program // block_n) * block_n)
    return chunk, -(-max(capacities) // chunk)


def decode(q, key, value, cache, scale=None, block_n=None, programs=None, num_warps=4, num_stages=2):
    """One decode step: store each sequence's new token in its slot and attend over its KV head's valid slots
    (order does not matter to softmax). One custom op, torch.ops.moa.decode, that torch.compile sees whole: the
    decode kernel, the merge kernel when heads are split, the length's increment; no host sync.
    q: [B, H, d]; key, value: [B, G, d], the new token (key after RoPE); cache: SinkRingCache, whose `length`
    advances by one. Returns [B, H, d] in q's dtype.
    Each KV head's slots are read once for all its query heads; heads are split into chunks of slots across
    programs (split-KV), and the partial results are merged by log-sum-exp. block_n, programs: the cache's
    (fixed when it was made) unless given."""
    if not q.is_cuda and not INTERPRETED:
        raise ValueError(f"decoding on {q.device} needs Triton's CPU interpreter, but this machine has a GPU: move the "
                         "model to cuda, or set TRITON_INTERPRET=1 before importing kernel")
    block_n, programs = block_n or cache.block_n, programs or cache.programs
    chunk, splits = ((cache.chunk, cache.splits) if (block_n, programs) == (cache.block_n, cache.programs) else
                     split_kv(cache.k.shape[0], cache.capacities, block_n, programs))
    scale = (scale if scale is not None else q.shape[-1] ** -0.5) * 1.4426950408889634   # 1/ln(2): kernels use exp2
    return torch.ops.moa.decode(q, key, value, cache.k, cache.v, cache.length, cache.offsets, cache.capacity,
                                cache.pad, cache.sink, scale, block_n, chunk, splits, num_warps, num_stages)


@torch.library.custom_op("moa::decode", mutates_args=("k", "v", "length"))
def _decode_op(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               length: torch.Tensor, offsets: torch.Tensor, capacity: torch.Tensor, pad: torch.Tensor, sink: int,
               qk_scale: float, block_n: int, chunk: int, splits: int, num_warps: int, num_stages: int
               ) -> torch.Tensor:
    """`decode` as one custom op: torch.compile sees one call that writes k, v and length, and does not trace into
    the Triton launches (a CUDA graph captures them like any kernel). k, v, length, offsets, capacity, pad: the
    SinkRingCache's tensors; qk_scale: the softmax scale times 1/ln(2); the rest: static launch settings."""
    B, H, d = q.shape
    G = capacity.shape[0]
    group = H // G
    d_pad = max(16, triton.next_power_of_2(d))               # tl.dot needs >= 16 and a power of two
    out = torch.empty(B, G, splits, group, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, G, splits, group, dtype=torch.float32, device=q.device)
    key, value = key.contiguous(), value.contiguous()
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():   # Triton launches on the current GPU
        _decode_kernel[(G * splits, B)](
            q.contiguous(), key, value, k, v, out, lse, offsets, capacity, pad, length, sink, chunk, splits, qk_scale,
            H * d, key.stride(0), k.stride(0),
            G=G, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, D_PAD=d_pad, BLOCK_N=block_n,
            # float32 inputs get exact products; so do bf16/fp16 under TRITON_INTERPRET, whose half-precision tl.dot
            # gives wrong results on the CPU (triton 3.9)
            F32_DOT=q.dtype == torch.float32 or INTERPRETED,
            num_warps=num_warps, num_stages=num_stages)
        length.add_(1)                                            # after the kernel, which read the old length
        if splits == 1:                                           # nothing to merge
            return out.view(B, H, d).to(q.dtype)
        final = torch.empty(B, H, d, dtype=q.dtype, device=q.device)
        _merge_kernel[(H, B)](out, lse, final, splits, G=G, GROUP=group, D=d, D_PAD=d_pad, BLOCK_S=16)
        return final


@_decode_op.register_fake
def _decode_meta(q, *args):
    """What torch.compile traces instead of the op: its output's shape and dtype, those of q (contiguous)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def decode_reference(q, keys, values, scale=None):
    """Plain PyTorch decode over explicit per-head key sets (float64 if given float64).
    q: [B, H, d]; keys, values: lists over KV heads of [B, n_k, d] (n_k may differ). Returns [B, H, d]."""
    B, H, d = q.shape
    group = H // len(keys)
    outs = []
    for kv, (k, v) in enumerate(zip(keys, values)):
        qh = q[:, kv * group:(kv + 1) * group]                                                  # [B, group, d]
        a = (qh @ k.transpose(1, 2) * (scale if scale is not None else d ** -0.5)).softmax(-1)
        outs.append(a @ v)
    return torch.cat(outs, 1)


# ----------------------------------------------------------------------------------------------------------------
# A transformers model following a plan (moa.apply_plan): its attention, its static cache, generate (SPEC §2, §9)


class MoAError(Exception):
    """Bad input: the message says what was wrong and what to do. The CLI prints it without a traceback."""


def check_length(n, limit, fix="shorten the prompt or max_new_tokens"):
    if n > limit:
        raise MoAError(f"{n} tokens (prompt + new tokens) exceed the {limit} this plan allows (its validation "
                       f"length, or the model's context): {fix}")


def left_padding(attention_mask, n):
    """Leading padding tokens per sequence [B] in the last n columns of a 2D mask [B, >= n], or None where the mask
    is None or pads no sequence. One host sync, for the check and the None."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -n:].bool()
    pad = (~mask).sum(1)
    left = (mask == (torch.arange(n, device=mask.device)[None] >= pad[:, None])).all()
    left, padded = torch.stack([left, pad.any()]).tolist()
    if not left:
        raise MoAError("moa supports left padding only: set tokenizer.padding_side = \"left\"")
    return pad if padded else None


def plan_attention(module, query, key, value, pad, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry "moa". query [B, H, q, d], key/value [B, G, q, d] -> [B, q, H, d]; pad: leading
    padding [B] (padding_mask) or None. N: the sequence's length, or a PlanCache's N: the first prompt chunk is
    stored and goes through FlexAttention, a later chunk attends to the cache, a new token goes through the decode
    kernel. A decode step reads no changing host state and never syncs: torch.compile traces it once."""
    layer, module.moa_layer = module.moa_layer, None         # set by PlanCache.update, cleared for a cacheless call
    q = query.shape[2]
    if layer is not None and not torch.compiler.is_compiling():   # the host count of N (PlanLayer); not compiled
        layer.count(q)
    if layer is not None and layer.ring.prefilled:           # a decode step or a later prompt chunk
        if q == 1:
            return decode(query[:, :, 0], key[:, :, 0], value[:, :, 0], layer.ring, scaling)[:, None], None
        if pad is not None:
            raise MoAError("a sequence's left padding runs past the first prefill chunk: use a larger "
                           "prefill_chunk_size")
        w = module.moa_windows(layer.n).tolist()
        return chunk_attention(query, key, value, layer.ring, w, scaling).transpose(1, 2), None
    if layer is None and q != key.shape[2]:                  # keys from another cache: transformers' DynamicCache
        raise MoAError("a model that follows a plan decodes through its own cache: pass past_key_values="
                       "kernel.PlanCache(model, n) (n: prompt + new tokens) to the first call, or use model.generate")
    n = layer.n if layer is not None else key.shape[2]
    check_length(n, module.moa_limit)
    if layer is not None:
        layer.ring.prefill(key, value, pad)
    w = module.moa_windows(n).tolist()
    return prefill(query, key, value, w, module.moa_sink, scaling, pad).transpose(1, 2), None


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """AttentionMaskInterface entry "moa", once per forward pass: the leading padding [B] of the q_length tokens
    (left_padding), None for a decode step (the cache holds its padding; a growing mask would recompile the step).
    Its own answer passes as is: generate makes the mask before the forward pass makes it again."""
    if attention_mask is None or attention_mask.dim() == 1:
        return attention_mask
    return None if q_length == 1 and attention_mask.shape[-1] > 1 else left_padding(attention_mask, q_length)


AttentionInterface.register("moa", plan_attention)          # the attention moa.apply_plan gives a model
AttentionMaskInterface.register("moa", padding_mask)


class PlanLayer(CacheLayerMixin):
    """One layer of a PlanCache: a SinkRingCache of per-KV-head `capacities` for N = n tokens, allocated at
    the first update; the attention stores the tokens. `stored` counts eager calls' tokens on the host, to refuse
    more than N without a sync; a compiled step cannot (it would recompile), so generate checks its N once."""
    is_compileable = True   # generate then compiles the decode step (CUDA graphs on a GPU)

    def __init__(self, capacities, sink, n):
        super().__init__()
        self.capacities, self.sink, self.n, self.ring, self.stored = capacities, sink, n, None, 0

    def lazy_initialization(self, key_states, value_states=None):
        self.allocate(len(key_states), key_states.shape[-1], key_states.dtype, key_states.device)   # [B, G, q, d]

    def allocate(self, batch, head_dim, dtype, device):
        self.ring = SinkRingCache(batch, self.capacities, head_dim, self.sink, dtype, device)
        self.is_initialized = True

    def rows(self, start, stop):
        part = copy.copy(self)
        part.ring = self.ring.rows(start, stop)
        return part

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        return key_states, value_states

    def count(self, tokens):
        if self.stored + tokens > self.n:
            raise MoAError(f"the plan cache was built for {self.n} tokens; got {tokens} more after {self.stored}")
        self.stored += tokens

    def get_seq_length(self):
        """Tokens stored so far, padding included: a 0-dim tensor on the device once there is a prompt."""
        return self.ring.length if self.ring is not None else 0

    def get_max_length(self):
        return self.n

    def get_mask_sizes(self, query_length):
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx):
        for x in (self.ring.k, self.ring.v, self.ring.pad):      # in place: the tensors keep their addresses
            x.copy_(x.index_select(0, beam_idx.to(x.device)))


class PlanCache(Cache):
    """The static sink + ring KV cache (SPEC §9) of a model following a plan, for N = n tokens (prompt + new).
    generate builds its own; a manual loop: model(ids, attention_mask=mask, past_key_values=PlanCache(model, n))."""

    def __init__(self, model, n):
        if model.__dict__.get("moa_plan") is None:          # modules keep their rules after a plan is taken off
            raise MoAError("the model follows no plan: call moa.apply_plan(model, plan) first")
        self.modules = [m for m in model.modules() if hasattr(m, "moa_sink")]     # those moa.apply_plan gave rules
        check_length(n, self.modules[0].moa_limit)
        super().__init__(layers=[PlanLayer(m.moa_capacities(n).tolist(), m.moa_sink, n) for m in self.modules])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.modules[layer_idx].moa_layer = self.layers[layer_idx]      # for plan_attention, this call only
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def prefill_rows(self, batch, rows, dtype, device, prefill):
        """Start the cache of `batch` sequences `rows` at a time (activations of `rows` sequences at most):
        prefill(start, stop, part) stores those rows through `part`, a PlanCache over their slice of the tensors.
        Returns prefill's results, one per group."""
        for layer, m in zip(self.layers, self.modules):
            layer.allocate(batch, m.head_dim, dtype, device)
        done, padded, part = [], False, copy.copy(self)
        for start in range(0, batch, rows):
            part.layers = [layer.rows(start, start + rows) for layer in self.layers]
            for layer in self.layers:
                layer.ring.length.zero_()                # the group's prompt starts an empty cache (one length a layer)
            done.append(prefill(start, start + rows, part))
            padded |= part.layers[0].ring.padded
        for layer, own in zip(self.layers, part.layers):    # every group stored the same prompt length
            layer.stored, layer.ring.prefilled, layer.ring.padded = own.stored, True, padded
        return done


class DeferredPlanStop(generation_utils.DeferredStopCheck):
    """transformers' DeferredStopCheck (its default on mps only) for a PlanCache: the stop is read a step late, so the
    host queues step t + 1 while the GPU runs step t. The extra step fits N = max_length but may overwrite a ring
    slot: a cache that generate returns keeps the plain check."""

    @staticmethod
    def is_supported(device, cache, cache_is_returned, is_assistant):
        return isinstance(cache, PlanCache) and not cache_is_returned and not is_assistant

    def __init__(self, input_ids, max_length, cache, cache_is_returned, streamer=None):
        if input_ids.device.type != "cpu":
            return super().__init__(input_ids, max_length, None, False, streamer)
        generation_utils.StopCheck.__init__(self, streamer)      # the CPU has no events: its ops are done on return
        self.max_length, self.cache, self.is_first_step, self.stop_reported = max_length, None, True, False
        done = type("Done", (), {"record": lambda self: None, "synchronize": lambda self: None})()
        self.slots = collections.deque((torch.zeros((), dtype=bool), torch.zeros(len(input_ids), dtype=torch.long),
                                        done) for _ in range(2))


PREFILL_TOKENS = 16384   # prompt tokens per forward pass of a plan's prefill: a larger batch goes in by rows


def generate_with_plans(model):
    """Replacements, bound to `model`, for _prepare_cache_for_generation (a PlanCache of N = max_length, or a check
    that a given one holds that many), _prefill (eager, by rows: shapes change per chunk, padding is checked on the
    host) and generate (DeferredPlanStop for the call)."""
    cls = type(model)

    def prepare_cache(config, model_kwargs, *args):
        cache = model_kwargs.get("past_key_values")
        if cache is None and config.use_cache is not False:
            own = model_kwargs["past_key_values"] = PlanCache(model, config.max_length)
            config.cache_implementation = None         # this call's copy: the plan's cache replaces the one asked for
            cls._prepare_cache_for_generation(model, config, model_kwargs, *args)
            own._is_user_defined = False               # generate's own, not the caller's (which it would return)
            return
        if isinstance(cache, PlanCache) and cache.get_max_length() < config.max_length:
            raise MoAError(f"the plan cache was built for {cache.get_max_length()} tokens; generate needs "
                           f"{config.max_length} (prompt + max_new_tokens)")
        return cls._prepare_cache_for_generation(model, config, model_kwargs, *args)

    def prefill(input_ids, config, model_kwargs, *args, **kwargs):
        eager = copy.copy(config)
        eager.disable_compile = True
        cache, (B, P) = model_kwargs.get("past_key_values"), input_ids.shape
        rows = max(1, PREFILL_TOKENS // min(P, config.prefill_chunk_size or P))
        if (rows >= B or not isinstance(cache, PlanCache) or cache.layers[0].is_initialized
                or config.output_hidden_states or config.output_attentions):
            return cls._prefill(model, input_ids, eager, model_kwargs, *args, **kwargs)

        def rows_prefill(start, stop, part):           # batch-first inputs cut to the rows, the rest as it is
            cut = {k: v[start:stop] if torch.is_tensor(v) and v.dim() and len(v) == B else v
                   for k, v in model_kwargs.items()}
            return cls._prefill(model, input_ids[start:stop], eager, {**cut, "past_key_values": part}, *args, **kwargs)
        done = cache.prefill_rows(B, rows, model.dtype, input_ids.device, rows_prefill)
        out = done[-1]
        out.logits, out.past_key_values = torch.cat([o.logits for o in done]), cache
        return out

    @functools.wraps(cls.generate)
    def generate(*args, **kwargs):
        before, generation_utils.DeferredStopCheck = generation_utils.DeferredStopCheck, DeferredPlanStop
        try:
            return cls.generate(model, *args, **kwargs)
        finally:
            generation_utils.DeferredStopCheck = before
    return prepare_cache, prefill, generate


# ----------------------------------------------------------------------------------------------------------------
# Profiling: each head's influence histograms over δ = i - j, inside the attention backward (SPEC §5, §5.1)
#   influence_attention -> attention whose backward also adds the histograms: on a GPU FlexAttention's own forward and
#                          backward, plus `influence` on the gradient of its output
#   influence           -> the fused Triton kernel: the histograms from q, k, v, O, dO and the row log-sum-exp
#   influence_reference -> the same as a PyTorch loop over query blocks that also returns dq, dk, dv: the CPU's
#                          path and the reference the kernel is tested against

REFERENCE_BLOCK_SCORES = 1 << 25   # attention scores held at once by influence_reference (x4 bytes, ~6 copies)
# The kernel's tile and launch (bench/profiling.py tries others; tl.dot needs a tile of at least 16). num_warps None: 4
# up to head dim 64, else 8 (compiled for sm_90, 4 warps spill registers at head dim 128 and 8 do not).
INFLUENCE_LAUNCH = dict(block=64, num_warps=None, num_stages=2)
FUSED_PROFILE = None   # influence_attention's path: None = fused on a GPU, influence_reference on a CPU (measured: the
                       # interpreted kernel is slower there); True or False forces one (tests, bench/profiling.py)


def diagonal_sums(e):
    """Sum a block of scores along its diagonals. e: [..., R, C] whose rows are the last R queries i = C-R+r and
    columns the keys j = 0..C-1. Returns [..., C] with out[δ] = Σ_r e[r, i_r - δ] (δ = i - j)."""
    R, C = e.shape[-2:]
    padded = F.pad(e, (R, 0))                                   # row r: R zeros, then e[r]
    # A view whose rows step one element further: [r, t] is padded[r, r + t] = e[r, i_r - δ] at t = C - δ.
    skew = padded.as_strided((*e.shape[:-2], R, C + 1), (*padded.stride()[:-2], R + C + 1, 1))
    return skew.sum(-2)[..., 1:].flip(-1)


def influence_reference(q, k, v, do, scale, hist, sink, windows=None):
    """Backward of causal softmax attention under a plan's masks (windows: [G] per KV head; None: dense), in query
    blocks and float32, that also adds each head's influence histogram to `hist`. With A = softmax row over the
    kept keys, G_ij = dO_i·V_j, D_i = Σ_k A_ik G_ik, and a_ij = exp(s_ij - lse_i) for a key the mask hides:
        dropping a kept key j:     ΔL_ij = A_ij (D_i - G_ij) / (1 - A_ij)       (SPEC §5)
        restoring a hidden key j:  ΔL_ij = a_ij (G_ij - D_i) / (1 + a_ij)       (SPEC §5.1)
    hist[h, δ] += Σ_i ΔL_{i,i-δ} over keys j >= sink: |ΔL| at dense (E_ij, SPEC §5), signed at a plan (§5.1).
    q, do: [B, H, N, d]; k, v: [B, G, N, d]; hist: [H, N] float64. Returns dq [B, H, N, d], dk, dv [B, G, N, d]."""
    B, H, N, d = q.shape
    G = k.shape[1]
    g = H // G
    q, do = (t.float().reshape(B, G, g, N, d) for t in (q, do))
    k, v = k.float(), v.float()
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rows = max(1, REFERENCE_BLOCK_SCORES // (B * H * N))
    pos = torch.arange(N, device=q.device)
    w = torch.full((G,), N, device=q.device) if windows is None else torch.as_tensor(windows, device=q.device)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        qb = q[:, :, :, i0:i1].flatten(2, 3) * scale                           # [B, G, g*R, d], scaled
        dob = do[:, :, :, i0:i1].flatten(2, 3)
        kb, vb = k[:, :, :i1], v[:, :, :i1]                                    # [B, G, C, d], C = i1
        i, j = pos[i0:i1, None], pos[None, :i1]
        kept = sees(i, j, w[:, None, None, None], sink)                        # [G, 1, R, C]
        s = (qb @ kb.transpose(-1, -2)).unflatten(2, (g, i1 - i0)).masked_fill_(j > i, float("-inf"))
        s -= s.masked_fill(~kept, float("-inf")).logsumexp(-1, keepdim=True)   # s_ij - lse_i: [B, G, g, R, C]
        a = s.exp().masked_fill_(~kept, 0)                                     # A
        grad_a = (dob @ vb.transpose(-1, -2)).unflatten(2, (g, i1 - i0))  # G_ij
        out = (a.flatten(2, 3) @ vb).unflatten(2, (g, i1 - i0))                # O_i = Σ_j A_ij V_j
        grad_a -= (out * do[:, :, :, i0:i1]).sum(-1, keepdim=True)             # G_ij - D_i, D_i = dO_i·O_i
        ds = a * grad_a                                                        # dL/dS = A (G - D)
        dq[:, :, :, i0:i1] = (ds.flatten(2, 3) @ kb).unflatten(2, (g, i1 - i0)) * scale
        dk[:, :, :i1] += ds.flatten(2, 3).transpose(-1, -2) @ qb
        dv[:, :, :i1] += a.flatten(2, 3).transpose(-1, -2) @ dob
        if windows is None:
            e = ds.abs_().div_((1 - a).clamp_min_(1e-6))                       # |ΔL_ij| = |dS_ij| / (1 - A_ij)
        else:                                                                  # a / (1 + a) = sigmoid(s - lse)
            e = torch.where(kept, -ds / (1 - a).clamp_min(1e-6), grad_a * s.sigmoid_())
        e = e.sum(0)                                                           # j > i is 0 already (A = a = 0)
        e[..., :sink] = 0                                                      # sink keys are never dropped
        hist[:, :i1] += diagonal_sums(e).flatten(0, 1)
    return dq.view(B, H, N, d), dk, dv


@triton.jit
def _influence_kernel(Q, K, V, Do, Delta, Lse, Windows, Acc, B, N, sink, qk_scale,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                      H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK: tl.constexpr, SIGNED: tl.constexpr, F32_DOT: tl.constexpr):
    """Program (h, m): query head h, block diagonal m. It walks the tiles whose query block t and key block t - m lie
    m blocks apart (t from m on, past key blocks wholly in the sink; every sequence of the batch), so every pair (i, j)
    of a tile has i - j = m*BLOCK + r - c for its row r and column c: the tile's sum over the walk, Acc[h, m]
    [BLOCK, BLOCK] (float32), holds the histogram of block diagonal m, and a diagonal sum on the host finishes it.
    Per tile, in float32: s = q k^T * scale, G = dO v^T, D_i = Delta[b, h, i], p = exp(s - lse) (A for a kept key,
    a for a hidden one), and E = |A (G - D)| / (1 - A) at dense (SIGNED false), or at a plan A (D - G) / (1 - A) for a
    kept key and (G - D) a / (1 + a) for a hidden one (SIGNED). Keys j < sink and j > i add nothing.
    Scores are in log2 units (qk_scale carries 1/ln 2; the lse is converted) so that exp2 serves. Q, Do: [B, H, N, D];
    K, V: [B, G, N, D] (any strides but the last, 1); Delta, Lse: [B, H, N] float32; Windows: [G] int32."""
    h, m = tl.program_id(0), tl.program_id(1)   # h fastest: all heads' longest walks (m = 0) are launched first
    kv = h // GROUP
    window = tl.load(Windows + kv)
    r = tl.arange(0, BLOCK)
    c = tl.arange(0, D_PAD)
    dims = c < D
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for b in range(0, B):
        for t in range(m + sink // BLOCK, tl.cdiv(N, BLOCK)):   # key blocks wholly in the sink add nothing: skipped
            i = t * BLOCK + r                   # query positions of the tile's rows
            j = (t - m) * BLOCK + r             # key positions of its columns
            rows = (i < N)[:, None] & dims[None, :]
            cols = (j < N)[:, None] & dims[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + i[:, None] * stride_qn + c[None, :], mask=rows, other=0.0)
            do = tl.load(Do + b * stride_db + h * stride_dh + i[:, None] * stride_dn + c[None, :], mask=rows,
                         other=0.0)
            k = tl.load(K + b * stride_kb + kv * stride_kh + j[:, None] * stride_kn + c[None, :], mask=cols, other=0.0)
            v = tl.load(V + b * stride_vb + kv * stride_vh + j[:, None] * stride_vn + c[None, :], mask=cols, other=0.0)
            lse = tl.load(Lse + (b * H + h) * N + i, mask=i < N, other=0.0) * 1.4426950408889634   # ln -> log2
            delta = tl.load(Delta + (b * H + h) * N + i, mask=i < N, other=0.0)
            if F32_DOT:   # exact float32 products (not tf32); the interpreter's half-precision tl.dot is wrong
                q, k, v, do = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32), do.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None]   # log2 of A or a
            grad = tl.dot(do, tl.trans(v), input_precision="ieee") - delta[:, None]       # G - D
            p = tl.exp2(s)
            ds = p * grad                                                                  # dL/dS at a kept key
            # 1 - A is 0 only for a row that sees one key, whose dropping is not first order: clamp, as the reference
            if SIGNED:   # a hidden key's a / (1 + a) as a sigmoid: its exp(s - lse) may overflow where that cannot
                kept = (i[:, None] - j[None, :]) < window
                e = tl.where(kept, -ds / tl.maximum(1.0 - p, 1e-6), grad / (1.0 + tl.exp2(-s)))
            else:
                e = tl.abs(ds) / tl.maximum(1.0 - p, 1e-6)
            seen = (j[None, :] <= i[:, None]) & (i < N)[:, None] & (j >= sink)[None, :]
            acc += tl.where(seen, e, 0.0)
    M = tl.num_programs(1)
    tl.store(Acc + ((h * M + m) * BLOCK + r[:, None]) * BLOCK + r[None, :], acc)


def influence(q, k, v, o, do, lse, scale, hist, sink, windows=None, **launch):
    """Add each query head's influence histogram over δ (SPEC §5 at dense: |ΔL|; §5.1 at a plan: signed) to `hist`,
    as influence_reference does, from what the attention forward and backward hold, in O(N) memory per head.
    q, o, do: [B, H, N, d]; k, v: [B, G, N, d] (any dtype; last dims contiguous or they are copied); lse: [B, H, N]
    natural log-sum-exp of each row's scaled scores over the keys it keeps; windows: [G] per KV head, or None (dense);
    hist: [H, N]. launch: block, num_warps, num_stages, each INFLUENCE_LAUNCH's unless given."""
    B, H, N, d = q.shape
    G = k.shape[1]
    launch = {**INFLUENCE_LAUNCH, **launch}
    BLOCK = launch["block"]
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    # D_i = dO_i·O_i, the row's mean of G under A, once per row (in the kernel it cost registers at every tile)
    delta = torch.linalg.vecdot(do.float(), o.float())                                         # [B, H, N]
    M = triton.cdiv(N, BLOCK)
    acc = torch.empty(H, M, BLOCK, BLOCK, dtype=torch.float32, device=q.device)                 # N*BLOCK per head
    w = torch.tensor([N] * G if windows is None else [int(x) for x in windows], dtype=torch.int32, device=q.device)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():   # Triton launches on the current GPU
        _influence_kernel[(H, M)](
            q, k, v, do, delta, lse.float().contiguous(), w, acc, B, N, sink, scale * 1.4426950408889634,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            H=H, GROUP=H // G, D=d, D_PAD=max(16, triton.next_power_of_2(d)), BLOCK=BLOCK,
            SIGNED=windows is not None, F32_DOT=q.dtype in (torch.float32, torch.float64) or INTERPRETED,
            num_warps=launch["num_warps"] or (4 if d <= 64 else 8), num_stages=launch["num_stages"])
    # Tile entry (r, c) of block diagonal m has δ = m*BLOCK + r - c: its diagonals r >= c land on m*BLOCK + 0..BLOCK-1,
    # those r < c on (m-1)*BLOCK + 1..BLOCK-1 (none at m = 0, where they are keys after their query).
    lower = diagonal_sums(acc).flatten(1)                                             # [H, M*BLOCK]
    upper = F.pad(diagonal_sums(acc.mT)[..., 1:].flip(-1), (1, 0))[:, 1:].flatten(1)   # [H, (M-1)*BLOCK]
    lower[:, :upper.shape[1]] += upper
    hist += lower[:, :N]


class ReferenceProfiledAttention(torch.autograd.Function):
    """Attention under a plan's masks (windows [G]; None: causal SDPA) whose backward is `influence_reference`."""

    @staticmethod
    def forward(ctx, q, k, v, scale, hist, sink, windows):
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.hist, ctx.sink, ctx.windows = scale, hist, sink, windows
        if windows is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return prefill(q.detach(), k.detach(), v.detach(), windows, sink, scale)   # flex: no grads on a CPU

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = influence_reference(q, k, v, do, ctx.scale, ctx.hist, ctx.sink, ctx.windows)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class Influence(torch.autograd.Function):
    """The identity on an attention output O whose backward adds the influence histograms (`influence`) from the
    gradient dO it passes on unchanged: the gradients of q, k, v stay the attention's own. What it saves (q, k, v,
    O, lse) the attention's backward holds anyway, and recomputing activations (checkpointing) recomputes it too."""

    @staticmethod
    def forward(ctx, o, q, k, v, lse, scale, hist, sink, windows):
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.hist, ctx.sink, ctx.windows = scale, hist, sink, windows
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        influence(q, k, v, o, do, lse, ctx.scale, ctx.hist, ctx.sink, ctx.windows)
        return do, None, None, None, None, None, None, None, None


def influence_attention(q, k, v, scale, hist, sink, windows=None):
    """Causal attention under a plan's masks (windows: [G] per KV head; None: dense) whose backward also adds each
    query head's influence histogram to hist [H, N] (float64): SPEC §5 at dense, §5.1 at a plan.
    q: [B, H, N, d]; k, v: [B, G, N, d]. Returns [B, H, N, d].
    Fused (FUSED_PROFILE): FlexAttention's forward and backward give O, the row log-sum-exp and dq, dk, dv, and the
    Triton kernel the histograms from dO; on a CPU, where FlexAttention has no backward, the gradients come through
    masked_reference (N^2 memory). Otherwise influence_reference is the whole backward."""
    B, H, N, d = q.shape
    if not (q.is_cuda if FUSED_PROFILE is None else FUSED_PROFILE):
        return ReferenceProfiledAttention.apply(q, k, v, scale, hist, sink, windows)
    w = tuple([N] * k.shape[1] if windows is None else (int(x) for x in windows))
    block_mask = _block_mask(w, int(sink), H, N, str(q.device), None)
    lse_only = AuxRequest(lse=True)
    if q.is_cuda:
        o, aux = _flex_compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_aux=lse_only)
    else:
        o = masked_reference(q, k, v, w, sink, scale)
        aux = flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask, scale=scale, enable_gqa=True,
                             return_aux=lse_only)[1]
    return Influence.apply(o, q, k, v, aux.lse.detach(), scale, hist, sink, windows)


def profile_attention(hists, sink, windows, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """moa.profile's AttentionInterface entry "moa_profile", with its first three arguments bound: influence_attention
    adding to hists[layer], made at the layer's first call on its tensors' device (a device map may spread layers).
    hists: {layer: [H, N] float64}; windows: [L][G] per KV head of each layer, or None (dense).
    query [B, H, N, d], key/value [B, G, N, d] -> [B, N, H, d]."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    if layer not in hists:
        hists[layer] = torch.zeros(query.shape[1], query.shape[2], dtype=torch.float64, device=query.device)
    out = influence_attention(query, key, value, scale, hists[layer], sink, None if windows is None else windows[layer])
    return out.transpose(1, 2), None
