"""
Attention for MoA plans at inference: every KV head k keeps the first `sink` tokens plus its W_k most recent ones.
  SinkRingCache    -> the static per-head sink + ring KV cache, one flat buffer per layer (SPEC §9)
  decode           -> fused Triton split-KV decode over the cache, one query token per sequence (SPEC §10), one
                      custom op to torch.compile, so a compiled decode step (CUDA graphs) captures it whole
  prefill          -> FlexAttention with a block mask, so whole dropped blocks are skipped (SPEC §10)
  masked_reference -> the same attention as plain masked PyTorch, the reference the fast paths are tested against
The decode benchmark is bench/kernel.py.
"""
from __future__ import annotations

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
from torch.nn.attention.flex_attention import BlockMask, flex_attention

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
