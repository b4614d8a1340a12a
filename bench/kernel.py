"""
The decode kernel's benchmark (a GPU): one layer's decode attention against dense SDPA and FlexAttention decode, against
the bandwidth ceilings measured in the same run, the per-call floor in a CUDA graph, and the targets.
Run:  python bench/kernel.py
"""
import functools
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # moa.py and kernel.py live one folder up

import numpy as np
import torch
import torch.nn.functional as F

from kernel import SinkRingCache, decode   # before Triton: without a GPU, kernel.py turns its interpreter on
import triton  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402


def spread_capacities(heads, n, density, sink, rng):
    """Per-KV-head capacities with a realistic spread, mean exactly density * n: a few heads dense, the rest
    local windows of varied size. Returns a list of `heads` ints."""
    if density >= 1:
        return [n] * heads
    dense = max(1, heads // 8) if density * heads >= 1.5 else 0
    budget = round(density * heads * n) - dense * n
    share = rng.dirichlet(np.ones(heads - dense)) * budget
    caps = np.clip(share.round(), sink + 64, n).astype(int)
    for i in np.argsort(-caps):                               # land exactly on the budget, within [sink + 64, n]
        caps[i] = np.clip(caps[i] + budget - caps.sum(), sink + 64, n)
    return [n] * dense + sorted(caps.tolist())


# launch configs the benchmark tries; per_sm: split-KV programs per SM (the cache's default is 4). Fewer programs per
# SM than fit at once leave no partial second wave; more give each SM more loads in flight
CONFIGS = [dict(block_n=64, num_warps=4, num_stages=2, per_sm=4),
           dict(block_n=128, num_warps=4, num_stages=3, per_sm=4),
           dict(block_n=128, num_warps=8, num_stages=3, per_sm=4),
           dict(block_n=64, num_warps=4, num_stages=4, per_sm=4),
           dict(block_n=64, num_warps=4, num_stages=2, per_sm=2),
           dict(block_n=64, num_warps=4, num_stages=2, per_sm=3),
           dict(block_n=64, num_warps=4, num_stages=2, per_sm=8)]


BIG_CALL = 256 << 20   # bytes: the smallest call the bandwidth target counts; also what a row's inputs rotate over,
                       # over 4x the H200's 60 MB L2, so no timed call finds its inputs there
# name: (H, G, d), batches, lengths. Only what the targets need plus a few small rows: the run stays short on an H200
GRID = {"llama3-8b": ((32, 8, 128), (1, 8, 32), (16384, 65536)), "smollm2": ((9, 3, 64), (8, 64), (4096, 8192))}
DENSITIES = (1.0, 0.5, 0.25)
_say = functools.partial(print, flush=True)   # every line reaches the log even if the run is cut short


def _gbs(nbytes, ms):
    """Bytes moved in `ms` milliseconds as GB/s (1e9 bytes a second)."""
    return nbytes / ms / 1e6


def ceilings(gib=2):
    """This device's bandwidth ceilings in GB/s, measured now with do_bench, the rows' timer. read: the faster of two
    read-only bf16 reductions over `gib` GiB (one sum of everything, one sum per row of 8192), bytes read: the
    ceiling of a decode call, which only reads; copy: a device-to-device copy of `gib` GiB, bytes read + written;
    read256: the whole sum over BIG_CALL bytes a call, rotated over the buffer, i.e. what per-call costs leave of the
    ceiling at the bandwidth target's smallest size. One buffer is over 30x the L2 and do_bench clears the L2 before
    every call, so no sum is served from it. Returns a dict."""
    from triton.testing import do_bench
    x = torch.randn(gib << 29, device="cuda", dtype=torch.bfloat16)       # 2^29 bf16 = 1 GiB; random, not zeros
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    whole = do_bench(lambda: x.sum(dtype=torch.float32), return_mode="median")        # bf16 read, float accumulate
    rows = do_bench(lambda: x.view(-1, 8192).sum(-1, dtype=torch.float32), return_mode="median")
    copy = do_bench(lambda: y.copy_(x), return_mode="median")
    parts, turn = x.view(-1, BIG_CALL // x.element_size()), itertools.count()
    part = do_bench(lambda: parts[next(turn) % len(parts)].sum(dtype=torch.float32), return_mode="median")
    c = dict(whole=_gbs(nbytes, whole), rows=_gbs(nbytes, rows), copy=_gbs(2 * nbytes, copy),
             read256=_gbs(BIG_CALL, part))
    c["read"] = max(c["whole"], c["rows"])
    _say(f"read ceiling: {c['read']:.0f} GB/s, the faster of two read-only bf16 sums over {gib} GiB (whole "
         f"{c['whole']:.0f}, per row {c['rows']:.0f}), bytes read")
    _say(f"device-to-device copy of {gib} GiB: {c['copy']:.0f} GB/s, bytes read + written")
    _say(f"a {BIG_CALL >> 20} MiB read-only sum per call, same timer: {c['read256']:.0f} GB/s = "
         f"{100 * c['read256'] / c['read']:.1f}% of the read ceiling")
    _say("%ceil below: our K/V bytes read per call over its time, as % of the READ ceiling (not the copy: a decode "
         "call only reads, and reading alone runs faster than a copy). us, GB/s, %ceil, xSDPA, xFlex: eager calls "
         "timed by do_bench, the fastest config (cfg); graph us, its %ceil, xSDPA and cfg: each config's calls "
         "recorded in one CUDA graph, as the compiled generate runs them (no host cost per call), the fastest, "
         "against SDPA's calls in a graph too")
    return c


def _time_decode(q, new_k, new_v, caps, n):
    """Milliseconds a call of our decode for each launch config in CONFIGS, by do_bench (eager: the host's per-call
    cost included) and inside a CUDA graph (as the compiled generate runs it: the kernels' time alone), over caches
    with `caps` slots per KV head, every slot in use, rotated so a call's inputs are not in the L2.
    Returns two lists, one value per config: eager, graph."""
    from triton.testing import do_bench
    B, _, d = q.shape
    copies = max(1, -(-BIG_CALL // (2 * B * sum(caps) * d * q.element_size())))
    caches = []
    for _ in range(copies):
        c = SinkRingCache(B, caps, d, 64, q.dtype, "cuda")
        c.k.normal_(), c.v.normal_()
        c.length.fill_(n - 1)                       # every slot in use; each call advances it and the ring wraps
        caches.append(c)
    turn = itertools.count()
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count

    def call(cfg):   # one decode on the next cache in turn
        launch = dict(block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                      programs=cfg["per_sm"] * sms)
        return lambda: decode(q, new_k, new_v, caches[next(turn) % copies], **launch)

    eager = [do_bench(call(cfg), return_mode="median") for cfg in CONFIGS]
    # a graph records max(copies, 10) calls over the rotated caches in turn, so its replays keep them out of the L2 too
    return eager, [_graph_ms(call(cfg), max(copies, 10)) for cfg in CONFIGS]


def _time_flex(flex_decode, q, full_k, full_v, caps, n):
    """Median ms of FlexAttention decode over the dense K/V of length n, its block mask keeping the same sink and
    windows as `caps`; NaN (and a printed reason) if it fails, so one failure costs a column, not the run."""
    from triton.testing import do_bench
    H, G = q.shape[1], full_k.shape[1]
    # first key of each query head's window; a tensor, not ints in the closure, so new lengths need no recompile
    start = (n + 64 - torch.tensor(caps, device="cuda")).repeat_interleave(H // G)
    try:
        mask = create_block_mask(lambda b, h, qi, kv: (kv < 64) | (kv >= start[h]), None, H, 1, n, device="cuda")
        return do_bench(lambda: flex_decode(q[:, :, None], full_k, full_v, block_mask=mask, enable_gqa=True),
                        return_mode="median")
    except Exception as e:   # noqa: BLE001 - report and go on
        _say(f"  FlexAttention failed: {type(e).__name__}: {str(e)[:200]}")
        return float("nan")


def _length_rows(name, H, G, d, B, n, flex_decode, rng, ceiling, with_flex):
    """The rows of one shape, batch and length, one per density, each printed as it comes. Returns dicts."""
    from triton.testing import do_bench
    q = torch.randn(B, H, d, device="cuda", dtype=torch.bfloat16)
    full_k = torch.randn(B, G, n, d, device="cuda", dtype=torch.bfloat16)
    full_v = torch.randn_like(full_k)
    new_k, new_v = torch.randn(2, B, G, d, device="cuda", dtype=torch.bfloat16)   # the token written
    # one dense K/V, not rotated: do_bench clears the L2 before every call
    sdpa_call = lambda: F.scaled_dot_product_attention(q[:, :, None], full_k, full_v, enable_gqa=True)
    sdpa, sdpa_graph = do_bench(sdpa_call, return_mode="median"), _graph_ms(sdpa_call, 10)
    rows = []
    for density in DENSITIES:
        caps = spread_capacities(G, n, density, 64, rng)
        times, graphs = _time_decode(q, new_k, new_v, caps, n)
        graph = np.nanmin(graphs) if not np.isnan(graphs).all() else float("nan")
        flex = _time_flex(flex_decode, q, full_k, full_v, caps, n) if with_flex else float("nan")
        r = dict(shape=name, B=B, n=n, density=density, ms=min(times), cfg=int(np.argmin(times)), sdpa=sdpa,
                 flex=flex, nbytes=2 * B * sum(caps) * d * 2, dense_nbytes=2 * B * G * n * d * 2, graph=graph,
                 gcfg=int(np.nanargmin(graphs)) if not np.isnan(graph) else -1, sdpa_graph=sdpa_graph)
        r["pct"] = 100 * _gbs(r["nbytes"], r["ms"]) / ceiling
        r["pct_graph"] = 100 * _gbs(r["nbytes"], r["graph"]) / ceiling
        rows.append(r)
        _say(f"{name:<10} {B:>3} {n:>6} {density:>7.2f} {r['ms'] * 1e3:>8.1f} {r['nbytes'] / 2**20:>8.1f} "
             f"{_gbs(r['nbytes'], r['ms']):>7.0f} {r['pct']:>6.1f} {sdpa / r['ms']:>6.2f} {flex / r['ms']:>6.2f} "
             f"{r['cfg']:>4} {graph * 1e3:>8.1f} {r['pct_graph']:>6.1f} {sdpa_graph / graph:>6.2f} {r['gcfg']:>4}")
    return rows


def _rows(ceiling, t0, flex_budget_s):
    """Every row of GRID x DENSITIES. FlexAttention is compiled once, dynamic (a recompile per head dim at most);
    past flex_budget_s seconds of the run its column is skipped, its compilations being the slowest part.
    Returns a list of dicts."""
    rng = np.random.default_rng(0)
    flex_decode = torch.compile(flex_attention, dynamic=True)   # one compilation for every batch and length
    _say("cfg: the fastest of the launch configs " + "; ".join(f"{i}: {c}" for i, c in enumerate(CONFIGS)))
    _say(f"{'shape':<10} {'B':>3} {'N':>6} {'density':>7} {'us':>8} {'MiB':>8} {'GB/s':>7} {'%ceil':>6} "
         f"{'xSDPA':>6} {'xFlex':>6} {'cfg':>4} {'graph us':>8} {'%ceil':>6} {'xSDPA':>6} {'cfg':>4}")
    rows = []
    for name, ((H, G, d), batches, lengths) in GRID.items():
        for B in batches:
            for n in lengths:
                with_flex = time.perf_counter() - t0 < flex_budget_s
                rows += _length_rows(name, H, G, d, B, n, flex_decode, rng, ceiling, with_flex)
    if any(np.isnan(r["flex"]) for r in rows):
        _say(f"xFlex nan: FlexAttention failed or was skipped (past {flex_budget_s} s)")
    return rows


def _events_ms(fn, repeats=20):
    """Median milliseconds of fn between two device events over `repeats` runs, after one run to warm up. No L2
    flush: it times the per-call floor, whose small inputs stay in the L2 in real decoding too."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def _repeat(fn, calls):
    """fn called `calls` times in a row, as one function."""
    def run():
        for _ in range(calls):
            fn()
    return run


def _graph_ms(fn, calls):
    """Milliseconds per call of fn in a CUDA graph (_graph_us); NaN and a printed reason if the capture fails, so a
    failure costs a column, not the run."""
    try:
        return _graph_us(fn, calls) / 1e3
    except Exception as e:   # noqa: BLE001
        _say(f"  graph timing failed: {type(e).__name__}: {str(e)[:200]}")
        return float("nan")


def _graph_us(fn, calls):
    """Microseconds per call of fn, captured `calls` times back to back in one CUDA graph, over graph replays.
    Warmed up on a side stream first, as PyTorch's CUDA graph docs require (lazy initialisations, kernel loads)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _repeat(fn, calls)()
    return _events_ms(graph.replay) * 1e3 / calls


def _floor(calls=100):
    """The per-call floor of a decode step on a small cache (smollm2's shape, B=1, N=4096, 50%: 1.5 MiB of K/V),
    where launches, not bytes, set the time: microseconds per call of `calls` calls in one CUDA graph, of an eager
    loop of `calls` calls, and by do_bench (which clears the L2 before each call, letting the host run ahead); the
    same for dense SDPA decode at that shape. Returns {"decode" | "sdpa": {"graph" | "eager" | "do_bench": us}}."""
    from triton.testing import do_bench
    H, G, d, n = 9, 3, 64, 4096
    cache = SinkRingCache(1, spread_capacities(G, n, 0.5, 64, np.random.default_rng(1)), d, 64, torch.bfloat16, "cuda")
    cache.k.normal_(), cache.v.normal_()
    cache.length.fill_(n - 1)      # every slot in use; the calls advance the length on the device, the ring wraps
    q = torch.randn(1, H, d, device="cuda", dtype=torch.bfloat16)
    new_k, new_v = torch.randn(2, 1, G, d, device="cuda", dtype=torch.bfloat16)
    full_k, full_v = torch.randn(2, 1, G, n, d, device="cuda", dtype=torch.bfloat16)
    fns = {"decode": lambda: decode(q, new_k, new_v, cache),
           "sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], full_k, full_v, enable_gqa=True)}
    out = {}
    for label, fn in fns.items():
        out[label] = dict(graph=float("nan"), eager=float("nan"), do_bench=float("nan"))
        try:           # a failed capture costs this line, not the summary
            out[label]["eager"] = _events_ms(_repeat(fn, calls)) * 1e3 / calls
            out[label]["do_bench"] = do_bench(fn, return_mode="median") * 1e3
            out[label]["graph"] = _graph_us(fn, calls)
        except Exception as e:   # noqa: BLE001
            _say(f"floor, {label} failed: {type(e).__name__}: {str(e)[:200]}")
    return out


def _summary(rows, ceil, floor, t0):
    """The targets, each with its rows' worst and best value and whether the worst meets it; the read ceiling's
    cross-checks; the per-call floor; the run's wall time. Printed last, so the tail of the output holds it all."""
    def xsdpa(r):
        return r["sdpa"] / r["ms"]

    def xsdpa_graph(r):
        return r["sdpa_graph"] / r["graph"]

    def sparse(density):
        return lambda r: r["density"] == density and r["n"] >= 16384 and r["B"] >= 8

    targets = [(f"calls >= {BIG_CALL >> 20} MiB: % of read ceiling >= 90", lambda r: r["nbytes"] >= BIG_CALL,
                lambda r: r["pct"], 90.0),
               ("  the same, inside a CUDA graph", lambda r: r["nbytes"] >= BIG_CALL, lambda r: r["pct_graph"], 90.0),
               ("50% density, N >= 16k, B >= 8: xSDPA >= 1.9", sparse(0.5), xsdpa, 1.9),
               ("  the same, both inside CUDA graphs", sparse(0.5), xsdpa_graph, 1.9),
               ("25% density, N >= 16k, B >= 8: xSDPA >= 3.6", sparse(0.25), xsdpa, 3.6),
               ("  the same, both inside CUDA graphs", sparse(0.25), xsdpa_graph, 3.6)]
    _say(f"\n{'target':<46} {'rows':>4} {'worst':>7} {'best':>7} {'met':>4}  worst row")
    for label, chosen, value, goal in targets:
        sel = [r for r in rows if chosen(r)]
        if not sel:
            _say(f"{label:<46} {0:>4}  no rows")
            continue
        worst = min(sel, key=value)
        _say(f"{label:<46} {len(sel):>4} {value(worst):>7.2f} {max(map(value, sel)):>7.2f} "
             f"{'yes' if value(worst) >= goal else 'NO':>4}  {worst['shape']} B={worst['B']} N={worst['n']} "
             f"density={worst['density']}")
    best = max(rows, key=lambda r: _gbs(r["dense_nbytes"], r["sdpa"]))
    sdpa_gbs = _gbs(best["dense_nbytes"], best["sdpa"])
    _say(f"read ceiling {ceil['read']:.0f} GB/s (copy {ceil['copy']:.0f}, bytes read + written); a "
         f"{BIG_CALL >> 20} MiB read-only sum reaches {100 * ceil['read256'] / ceil['read']:.1f}% of it")
    _say(f"dense SDPA decode's best read rate: {sdpa_gbs:.0f} GB/s = {100 * sdpa_gbs / ceil['read']:.1f}% of the "
         f"read ceiling ({best['shape']} B={best['B']} N={best['n']}); over 100 would mean the sums understate it")
    for label, f in floor.items():
        _say(f"per-call floor, {label:<6} (smollm2 B=1 N=4096 50%): {f['graph']:.1f} us in a CUDA graph, "
             f"{f['eager']:.1f} us in an eager loop, {f['do_bench']:.1f} us by do_bench")
    _say(f"wall time {time.perf_counter() - t0:.0f} s")


def need_gpu(script):
    """A one-line exit for a benchmark started where torch sees no GPU."""
    if not torch.cuda.is_available():
        sys.exit(f"error: {script} times a GPU, and torch sees no CUDA GPU here: run it on a machine with one")


def bench(flex_budget_s=150):
    """The decode benchmark (a GPU): versions and device; the bandwidth ceilings measured now; one row per GRID shape,
    batch, length and density (our decode at its fastest launch config: time, bytes, GB/s, % of the read ceiling,
    speedup over dense SDPA and FlexAttention decode); the per-call floor in a CUDA graph; the targets' summary."""
    need_gpu("bench/kernel.py")
    t0 = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    _say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {props.name}, "
         f"{props.multi_processor_count} SMs, {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB L2")
    ceil = ceilings()
    rows = _rows(ceil["read"], t0, flex_budget_s)
    floor = _floor()
    _summary(rows, ceil, floor, t0)


if __name__ == "__main__":
    bench()
