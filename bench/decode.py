"""
End-to-end decoding: model.generate with a plan against dense attention in transformers' static cache, both
compiled (generate's default on a GPU: CUDA graphs), dense eager for reference. For each prompt length: the given
batches, every method side by side; each method's largest batch that fits, found by search; every method again at
dense's largest batch; tokens/s, ms per step, time to the first token, peak memory, KV bytes, all beside the ideal
dense engine; then a profile of one decode step.
Run:  python bench/decode.py [--model llama3-8b|M] [--plans P.json ...] [--prompts 8192 16384] [--batch 8 16]
"""
import argparse
import math
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # moa.py and kernel.py live one folder up

import numpy as np
import torch
from transformers import StoppingCriteria

from bench.kernel import ceilings, need_gpu, spread_capacities
from kernel import PREFILL_TOKENS
from moa import SINK, cache_size, cli_errors, following, kv_heads, kv_rules, load_model, load_plan, make_plan

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=32768,
                 rope_theta=500000.0)


def random_model(shape, device, dtype=torch.bfloat16):
    """A Llama-architecture model with random weights of the given shape (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype,
                                                attn_implementation="sdpa").eval()


def synthetic_plan(config, density, n, seed=0):
    """Fixed windows (beta = 0) with a realistic spread per layer (a few heads dense, the rest local of varied size)
    whose KV density at length n is exactly `density` (bench/kernel.py's spread_capacities)."""
    rng = np.random.default_rng(seed)
    caps = np.array([spread_capacities(kv_heads(config)[1], n, density, SINK, rng)
                     for _ in range(config.num_hidden_layers)])
    return make_plan(caps - SINK, np.zeros(caps.shape), validate_length=n)


def kv_bytes(model, plan, batch, n, upto=None):
    """Bytes of K and V the cache holds for `batch` sequences of N = n tokens; with `upto`, the bytes a decode step
    at true position `upto` reads (each head's slots in use, no more than `upto`)."""
    H, G = kv_heads(model.config)
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // H
    caps = (np.full((model.config.num_hidden_layers, G), n) if plan is None else
            cache_size(*kv_rules(plan, model.config), n, plan["sink"]))
    return 2 * int(np.minimum(caps, upto or n).sum()) * d * batch * model.dtype.itemsize


def weight_bytes(model):
    """Bytes of weights a decode step reads: every parameter but an untied input embedding (a step reads B of its
    rows)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied = head is None or head.weight.data_ptr() != embedding.data_ptr()
    every = sum(p.numel() * p.element_size() for p in model.parameters())   # a tied weight counted once
    return every - untied * embedding.numel() * embedding.element_size()


def roofline_ms(model, plan, batch, prompt, new_tokens, ceiling):
    """The fewest ms a decode step can take: the weights and the K/V it must read (at the middle step of the
    generate) once, at `ceiling` GB/s. With plan None, the ideal dense engine's step."""
    return (weight_bytes(model) + kv_bytes(model, plan, batch, prompt + new_tokens, prompt + new_tokens // 2)) / \
        ceiling / 1e6


def prefill_chunk(batch):
    """Dense's prompt tokens per prefill chunk: kernel.PREFILL_TOKENS over the batch (a multiple of 128, at least 128),
    so its prefill's activations do not grow with the batch. A plan's generate needs none: it prefills a large batch a
    few whole prompts at a time (kernel.PREFILL_TOKENS tokens a forward pass)."""
    return max(128, PREFILL_TOKENS // batch // 128 * 128)


def bench_generate(model, plan, batch, prompt, tokens, eager=False, **extra):
    """One greedy generate of exactly `tokens` new tokens after random prompts [batch, prompt], as the bench runs it:
    dense (plan None) in transformers' static cache with SDPA, prefilled in chunks (prefill_chunk); a plan in its
    PlanCache. Either way generate compiles the decode step (CUDA graphs) unless `eager`: what users get by default."""
    ids = torch.randint(100, model.config.vocab_size - 100, (batch, prompt), device=model.device,
                        generator=torch.Generator(model.device).manual_seed(0))
    with following(model, plan):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0,
                              prefill_chunk_size=prefill_chunk(batch) if plan is None else None,
                              cache_implementation="static" if plan is None else None, disable_compile=eager, **extra)


SETTLE = 4   # decode steps left out of the rate: a new cache's CUDA graph is warmed up and recorded in the first ones


PROBE_PROMPT = 128   # prompt tokens of a fit probe or a plan's first call; its N (prompt + new tokens) is the real one


def time_generate(model, plan, batch, prompt, new_tokens, eager=False, steps=None):
    """A first generate that compiles for this shape, stopped once its decode step runs in a CUDA graph (2 + SETTLE
    tokens: its wall time is reported, compile and prefill included), then one timed token by token, whole or
    stopped after SETTLE + `steps` decode steps. Both have the same N = prompt + new tokens (another N recompiles);
    dense's first call has the real prompts (transformers compiles its prefill chunks, whose shape changes with the
    batch); a plan's is two: one group of its prefill's rows of real prompts (the shape every group has), then
    PROBE_PROMPT-token prompts for the whole batch (the decode step's shapes), so a large batch is prefilled once.
    Returns (first call s, time to the first token s, decode tokens/s, ms per step over the steps after SETTLE,
    peak GiB)."""
    stamps = []

    class Clock:   # generate's streamer hook: called with the prompt, then with each new token once it is on the host
        def put(self, _):   # no synchronize here: a plan's generate queues a step ahead, which a wait would undo
            stamps.append(time.perf_counter())

        def end(self):
            pass

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    short = prompt if plan is None else PROBE_PROMPT
    if plan is not None:
        rows = min(batch, max(1, PREFILL_TOKENS // prompt))
        bench_generate(model, plan, rows, prompt, new_tokens, eager, stopping_criteria=[StopAfter(1)])
    bench_generate(model, plan, batch, short, prompt + new_tokens - short, eager,
                   stopping_criteria=[StopAfter(2 + SETTLE)])
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stop = [StopAfter(1 + SETTLE + steps)] if steps and steps < new_tokens - 1 - SETTLE else []
    bench_generate(model, plan, batch, prompt, new_tokens, eager, streamer=Clock(), stopping_criteria=stop)
    step = (stamps[-1] - stamps[1 + SETTLE]) / (len(stamps) - 2 - SETTLE)   # stamps[0]: the prompt, [1]: 1st token
    return first, stamps[1] - t0, batch / step, 1e3 * step, torch.cuda.max_memory_allocated() / 2**30


def largest_batch(model, plan, prompt, new_tokens, cap=None):
    """The largest batch that fits, found by doubling from 1 until one does not, then by bisection, and its bound,
    the KV room: the sequences whose cache fits in what the weights and a 1 GiB runtime reserve leave of the GPU.
    First one sequence's real prompt is prefilled (eager, 2 decode steps): the rest of its peak past the weights and
    its cache is the prefill's activations, which do not grow with the batch (a plan prefills by rows, dense in
    chunks of PREFILL_TOKENS). Then each probe is cheap: beside that reserve, held, an eager generate of
    PROBE_PROMPT-token prompts with the real N, stopped after 2 decode steps, allocates the real cache.
    cap: the largest batch tried. Returns (batch, room, reserve GiB)."""
    free = torch.cuda.get_device_properties(model.device).total_memory / 2**30 - 1.0 - weight_bytes(model) / 2**30
    room = int(free / (kv_bytes(model, plan, 1, prompt + new_tokens) / 2**30))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    bench_generate(model, plan, 1, prompt, new_tokens, eager=True, stopping_criteria=[StopAfter(3)])
    reserve = max(0, torch.cuda.max_memory_allocated() - before - kv_bytes(model, plan, 1, prompt + new_tokens)) / 2**30
    torch.cuda.empty_cache()

    def fits(b):
        held = None
        try:
            held = torch.empty(int(reserve * 2**30), dtype=torch.uint8, device=model.device)
            bench_generate(model, plan, b, PROBE_PROMPT, prompt + new_tokens - PROBE_PROMPT, eager=True,
                           stopping_criteria=[StopAfter(3)])
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        del held                                  # the reserve goes back before the next probe
        torch.cuda.empty_cache()
        print(f"  batch {b}: {'fits' if ok else 'out of memory'} (KV room {room})", flush=True)
        return ok

    lo, hi = 1, None
    while hi is None and (cap is None or lo < cap):
        b = 2 * lo if cap is None else min(2 * lo, cap)
        lo, hi = (b, None) if fits(b) else (lo, b)
    while hi is not None and hi - lo > 1:
        b = (lo + hi) // 2
        lo, hi = (b, hi) if fits(b) else (lo, b)
    return lo, room, reserve


class StopAfter(StoppingCriteria):
    """generate's stopping criterion: stop after `tokens` new tokens, leaving max_new_tokens (so the cache's length,
    and the compiled graphs that depend on it) as the bench's runs had them."""
    def __init__(self, tokens):
        self.tokens, self.calls = tokens, 0

    def __call__(self, input_ids, scores, **_):
        self.calls += 1
        with torch.profiler.record_function(STEP_MARK):   # a mark for step_profile; nothing without a profiler
            return torch.full(input_ids.shape[:1], self.calls >= self.tokens, dtype=torch.bool,
                              device=input_ids.device)


KINDS = {"attention": ("decode_kernel", "flash", "fmha", "attention", "sdpa"), "merge": ("merge_kernel",),
         "matmul": ("gemm", "gemv", "nvjet", "cutlass", "matmul", "cublas", "splitk"),
         "norm, RoPE": ("rsqrt", "cos", "sin", "neg", "rotary")}   # words in a kernel's name (inductor names its
                                                                   # fused kernels after the ops inside)
HOST_GAP_US = 50   # GPU idle longer than this between two kernels is the host's (generate's Python between steps);
                   # shorter idle is inside the CUDA graph (launch latency between its kernels)
STEP_MARK = "moa_bench_step"   # StopAfter's mark in a profiler's trace, once per decode step
PROFILE_STEPS = 16             # decode steps step_profile counts


def kind(name):
    return next((k for k, words in KINDS.items() if any(w in name.lower() for w in words)), "other")


def step_profile(model, plan, batch, prompt, new_tokens, ms_per_step, eager=False, steps=PROFILE_STEPS):
    """Where one decode step's time goes, in ms: CUDA time in each of KINDS and in other kernels, the GPU's idle
    time between kernels inside the step's CUDA graph (gaps under HOST_GAP_US), and the rest of `ms_per_step` (the
    step's time measured without the profiler): the host's, where the GPU waits for generate's Python between steps.
    One generate of the bench's shape, stopped after 2 + SETTLE + steps tokens, is profiled (nothing left to
    compile); the kernels that start between StopAfter's marks of its last `steps` steps are counted, so the prefill
    and the first steps are left out. The host's share is not read from this profile: recording the CPU's ops slows
    the host. Returns ({kind: ms}, [(us per step, calls per step, kind, kernel name)], heaviest first)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench_generate(model, plan, batch, prompt, new_tokens, eager, stopping_criteria=[StopAfter(2 + SETTLE + steps)])
        torch.cuda.synchronize()
    events = prof.events()
    marks = sorted(e.time_range.start for e in events if e.name == STEP_MARK)[-steps - 1:]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type.name == "CUDA" and marks[0] <= e.time_range.start < marks[-1])
    idle, end, per_kernel = 0.0, spans[0][0], {}
    for start, stop, name in spans:                     # idle between kernels, overlapping ones merged
        idle += start - end if 0 < start - end < HOST_GAP_US else 0
        end = max(end, stop)
        us, calls = per_kernel.get(name, (0.0, 0))
        per_kernel[name] = (us + stop - start, calls + 1)
    kernels = sorted(((us / steps, calls / steps, kind(n), n) for n, (us, calls) in per_kernel.items()), reverse=True)
    step = dict.fromkeys([*KINDS, "other"], 0.0)
    for us, _, k, _ in kernels:
        step[k] += us / 1e3
    step["idle in graph"] = idle / steps / 1e3
    step["host"] = ms_per_step - sum(step.values())
    return step, kernels


def decode_bench(model, methods, prompts=(16384,), new_tokens=256, batches=(8, 16), largest=True, cap=None,
                 dense_steps=None, profile_batch=None):
    """For each prompt length: each method's largest batch that fits in GPU memory (largest_batch: a search, eager,
    up to `cap`), first, on a GPU nothing was compiled on yet; then every method side by side (methods(n): {name:
    (plan or None, eager)}) at dense's largest batch and at each of `batches`, and each plan at its own largest. One
    row per run: the first call's seconds (compile included), time to the first token, decode tokens/s and ms per
    step; the step's roofline (the bytes it must read at the read ceiling measured in this run, bench/kernel.py) and
    its share of it; the ideal dense engine's tokens/s at the same batch and the row's speedup over it; peak GiB and
    KV-cache GiB. Dense's rows time `dense_steps` decode steps (its static cache reads all N slots every step, so
    every step costs the same), the others all. Then a summary: each method's tokens/s at its largest batch against
    the ideal dense engine's at dense's largest, and the time to the first token against dense's; and a profile of
    one decode step at `profile_batch` for the longest prompt. Prompts beyond the model's context are shortened."""
    top = getattr(model.config, "max_position_embeddings", math.inf)
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):   # a compile per shape
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 256)
    ceiling = ceilings()["read"]
    weights = weight_bytes(model) / 2**30
    print(f"weights read per step {weights:.2f} GiB; roof ms: the weights and the K/V a step reads"
          f" (at its middle step) once at {ceiling:.0f} GB/s; ideal: the ideal dense engine, dense K/V read so")
    print(f"{'prompt':>6} {'method':>11} {'batch':>5} {'1st call s':>10} {'TTFT s':>7} {'tok/s':>8} {'ms/step':>7} "
          f"{'roof ms':>7} {'%roof':>6} {'ideal tok/s':>11} {'x ideal':>7} {'peak GiB':>8} {'KV GiB':>7}")
    done, table = [], []
    for prompt in sorted({min(p, top - new_tokens) for p in prompts}):
        n = prompt + new_tokens
        runs = methods(n)
        rows = {name: {} for name in runs}                # name: {batch: time_generate's result}

        def ideal(b):   # the ideal dense engine's tokens/s at batch b
            return b / roofline_ms(model, None, b, prompt, new_tokens, ceiling) * 1e3

        def run(name, batch):
            plan, eager = runs[name]
            try:
                r = time_generate(model, plan, batch, prompt, new_tokens, eager, dense_steps if plan is None else None)
            except torch.cuda.OutOfMemoryError:
                print(f"{prompt:>6} {name:>11} {batch:>5} out of memory")
                torch._dynamo.reset()                     # an out-of-memory in a graph's recording breaks them
                torch.cuda.empty_cache()
                return
            rows[name][batch] = r
            roof = roofline_ms(model, plan, batch, prompt, new_tokens, ceiling)
            table.append(dict(prompt=prompt, name=name, batch=batch, ttft=r[1], tps=r[2]))
            print(f"{prompt:>6} {name:>11} {batch:>5} {r[0]:>10.1f} {r[1]:>7.2f} {r[2]:>8.1f} {r[3]:>7.2f} "
                  f"{roof:>7.2f} {100 * roof / r[3]:>6.1f} {ideal(batch):>11.1f} {r[2] / ideal(batch):>7.2f} "
                  f"{r[4]:>8.1f} {kv_bytes(model, plan, batch, n) / 2**30:>7.2f}", flush=True)
            torch.cuda.empty_cache()

        found = {}
        for name, (plan, eager) in runs.items():
            if largest:
                found[name] = largest_batch(model, plan, prompt, new_tokens, cap)
                print(f"{prompt:>6} {name:>11} largest batch {found[name][0]} of a KV room of {found[name][1]} "
                      f"({100 * found[name][0] / found[name][1]:.0f}%; probes beside {found[name][2]:.1f} GiB of "
                      f"prefill activations)", flush=True)
        first = [found["dense"][0]] if "dense" in found else []   # on a GPU whose memory no compiled step holds yet
        for batch in first + [b for b in batches if b not in first]:
            for name in runs:
                run(name, batch)
        for name, (b, _, _) in found.items():                     # each plan at its own largest batch
            if b not in rows[name]:
                run(name, b)
        summary(table, prompt, ideal, found)
        for name, (plan, eager) in runs.items():
            b = profile_batch if profile_batch in rows[name] else max(rows[name], default=None)
            if b is not None:
                done.append((prompt, name, plan, eager, b, rows[name][b][3]))
    if profile_batch is not None:
        heads = [*KINDS, "other", "idle in graph", "host"]
        print(f"\none decode step, ms (torch.profiler, its last {PROFILE_STEPS} steps; idle in graph: gaps under "
              f"{HOST_GAP_US} us between kernels; host: the rest of the row's ms/step):\n"
              f"{'prompt':>6} {'method':>11} {'batch':>5} {'ms/step':>7} " + " ".join(f"{k:>13}" for k in heads))
        for prompt, name, plan, eager, b, ms in done:
            if prompt != done[-1][0]:
                continue                                                # the longest prompt only
            t, kernels = step_profile(model, plan, b, prompt, new_tokens, ms, eager)
            print(f"{prompt:>6} {name:>11} {b:>5} {ms:>7.2f} " + " ".join(f"{t[k]:>13.2f}" for k in heads), flush=True)
            for us, calls, k, n in kernels[:12]:                       # the heaviest kernels of a step
                print(f"{'':>25} {us:>9.1f} us {calls:>5.0f} calls  {k:<10} {n[:90]}")
            torch.cuda.empty_cache()


def summary(table, prompt, ideal, found):
    """One prompt's tokens/s of each method at its largest batch (found: {name: (batch, room, reserve)}) against the
    ideal dense engine's at dense's largest batch, and every row's time to the first token against dense's at the
    same batch."""
    rows = [r for r in table if r["prompt"] == prompt]
    dense = {r["batch"]: r for r in rows if r["name"] == "dense"}
    top = found.get("dense", (None,))[0]
    for r in rows:
        if top and r["batch"] == found.get(r["name"], (None,))[0]:
            print(f"{prompt:>6} {r['name']:>11} at its largest batch {r['batch']}: {r['tps']:.0f} tok/s, "
                  f"{r['tps'] / ideal(top):.2f}x the ideal dense engine's {ideal(top):.0f} at dense's largest, {top}")
        if r["name"] != "dense" and r["batch"] in dense:
            print(f"{prompt:>6} {r['name']:>11} batch {r['batch']}: time to the first token "
                  f"{r['ttft'] / dense[r['batch']]['ttft']:.2f}x dense's")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/decode.py", description="model.generate: dense vs MoA plans, compiled")
    p.add_argument("--model", default="llama3-8b", help="llama3-8b (random weights), or a model as in moa.py --model")
    p.add_argument("--plans", nargs="*", default=[], help="plan files (default: synthetic plans at 50%% and 25%%)")
    p.add_argument("--prompts", type=int, nargs="+", default=[16384])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="*", default=[8, 16],
                   help="batch sizes run for every method (none: only the largest batches)")
    p.add_argument("--no-largest", action="store_true", help="skip the search for each method's largest batch")
    p.add_argument("--max-batch", type=int, help="the largest batch the search tries (default: no cap)")
    p.add_argument("--dense-steps", type=int, default=64,
                   help="decode steps timed in dense's rows (default 64; 0: all); the plans' rows time all")
    p.add_argument("--methods", nargs="*",
                   help="run only these (dense, dense-eager, moa50, moa25, or plan file stems; default: all)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-step profile (at the first --batch)")
    a = p.parse_args(argv)
    need_gpu("bench/decode.py")
    with cli_errors():
        model = random_model(LLAMA3_8B, "cuda") if a.model == "llama3-8b" else load_model(a.model, "cuda")[0]
        files = {Path(f).stem: load_plan(f) for f in a.plans}

        def methods(n):   # name: (plan, eager); dense-eager is the reference transformers users get without compile
            plans = files or {f"moa{int(100 * d)}": synthetic_plan(model.config, d, n) for d in (0.5, 0.25)}
            every = {"dense": (None, False), "dense-eager": (None, True), **{k: (v, False) for k, v in plans.items()}}
            return {k: v for k, v in every.items() if not a.methods or k in a.methods}
        decode_bench(model, methods, a.prompts, a.new_tokens, a.batch, not a.no_largest, a.max_batch,
                     a.dense_steps or None, None if a.no_profile or not a.batch else a.batch[0])


if __name__ == "__main__":
    main()
