"""
Profiling's cost (SPEC §5, §5.1) on a GPU, several lengths in one run: time and peak memory of profiling one sample
(the fused kernel; with --reference also the PyTorch path it replaced) beside a plain forward and backward of the
same model. (Named profiling.py, not profile.py, which would shadow Python's own profile module.)
Run:  python bench/profiling.py [--model M|llama3-8b] [--length 8192 16384] [--reference] [--plan 0.5]
                                [--launch 64,4,2 128,8,2] [--checkpoint] [--trace] [--repeats 3]
llama3-8b is the Llama-3-8B shape with random weights (bf16); it recomputes activations layer by layer (gradient
checkpointing), as it must at 32k on one 80 GB GPU, and so does its plain forward and backward. smollm2-shape is the
embedded SmolLM2-135M's shape with random weights (bf16; the same work, without the model's file).
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # moa.py and kernel.py live one folder up

import torch

import kernel   # before Triton: without a GPU, kernel.py turns its interpreter on
from bench.decode import LLAMA3_8B, random_model, synthetic_plan
from bench.kernel import need_gpu
from moa import answer_loss, cli_errors, load_model, profile

SHAPES = {"llama3-8b": LLAMA3_8B,
          "smollm2-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=16384,
                                rope_theta=100000.0, tie_word_embeddings=True)}


def measure(fn, repeats):
    """fn's median seconds over `repeats` calls, their spread (max - min) and the peak GiB on the GPU, after a
    warm-up call (compiles); None if it does not fit."""
    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), max(times) - min(times), torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def profile_bench(model, lengths, reference=False, launches=(), plan_density=None, train=True,
                  trace=False, repeats=3):
    """One table per length n: median seconds of `repeats` timed calls, their spread, and peak GiB of
      forward+backward  the answer loss of profiling (the last 128 tokens), gradients to the activations only, SDPA:
                        the floor a profile's backward cannot go under;
      train step        (with `train`) the loss over every token, weight gradients too, SDPA;
      profiling         one sample at dense (SPEC §5), per kernel launch (block, num_warps or 0 for the kernel's
                        choice, num_stages; none given: kernel.INFLUENCE_LAUNCH), and at a
                        synthetic plan of KV density `plan_density` (§5.1); with `reference`, influence_reference's
                        path too (the profiler before the fused kernel).
    With `trace`, the GPU kernels of one fused profile by time (torch.profiler)."""
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; model: {model.config.num_hidden_layers} "
          f"layers, {model.config.num_attention_heads} q heads, {model.config.num_key_value_heads} KV heads, "
          f"{model.dtype}; gradient checkpointing: {model.is_gradient_checkpointing}")
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
        sample = {"input_ids": ids, "answer_start": torch.tensor([n - 128])}

        def plain():
            model.requires_grad_(False)
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            answer_loss(model, ids, sample["answer_start"].to(ids.device), inputs_embeds=embeds).sum().backward()

        def train_step():
            model.requires_grad_(True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        def profiled(fused=True, plan=None, launch=None):
            def run():
                kernel.FUSED_PROFILE, kernel.INFLUENCE_LAUNCH = fused, launch or kernel.INFLUENCE_LAUNCH
                profile(model, sample, plan=plan)
            return run

        default = dict(kernel.INFLUENCE_LAUNCH)
        rows = [("forward+backward", plain)]
        rows += [(f"profiling, block {b}, {w or 'auto'} warps, {s} stages",
                  profiled(launch=dict(block=b, num_warps=w or None, num_stages=s)))
                 for b, w, s in launches or [tuple(v or 0 for v in default.values())]]
        if plan_density:
            plan = synthetic_plan(model.config, plan_density, n)
            rows.append((f"profiling at a plan ({plan_density:.0%} KV)", profiled(plan=plan, launch=default)))
        if reference:
            rows.append(("profiling, reference path", profiled(fused=False)))
        if train:
            rows.append(("train step", train_step))
        print(f"\n{'length ' + str(n):<40} {'seconds':>8} {'spread':>7} {'peak GiB':>9} {'x fwd+bwd':>10}")
        floor = None
        for name, fn in rows:
            got = measure(fn, repeats)
            if got is None:
                print(f"{name:<40} {'out of memory':>27}", flush=True)
                continue
            floor = floor or got[0]
            print(f"{name:<40} {got[0]:>8.3f} {got[1]:>7.3f} {got[2]:>9.2f} {got[0] / floor:>10.2f}", flush=True)
        kernel.FUSED_PROFILE, kernel.INFLUENCE_LAUNCH = None, default
        model.requires_grad_(False).zero_grad(set_to_none=True)   # also after a train step out of memory
        if trace:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                profile(model, sample)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))


def launch(text):
    """--launch's BLOCK,NUM_WARPS,NUM_STAGES (NUM_WARPS 0: kernel.influence's choice by head dim)."""
    block, warps, stages = (int(x) for x in text.split(","))
    if block < 16 or block & (block - 1):
        raise argparse.ArgumentTypeError(f"block {block}: tl.dot needs a power of two of at least 16")
    return block, warps, stages


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/profiling.py")
    p.add_argument("--model", help=f"{' or '.join(SHAPES)} (random weights), or a model as in moa.py --model "
                                   "(default: the embedded SmolLM2)")
    p.add_argument("--length", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--reference", action="store_true", help="also time the PyTorch path (influence_reference)")
    p.add_argument("--plan", type=float, default=0.5, help="also profile at a synthetic plan of this KV density "
                                                          "(0: skip)")
    p.add_argument("--launch", type=launch, nargs="+", default=[],
                   help="the kernel's BLOCK,NUM_WARPS,NUM_STAGES to try, NUM_WARPS 0 for its choice by head dim "
                        "(default: kernel.INFLUENCE_LAUNCH)")
    p.add_argument("--checkpoint", action="store_true", help="recompute activations layer by layer (on for "
                                                             "llama3-8b)")
    p.add_argument("--no-train", action="store_true", help="skip the train step (all-token loss, weight gradients)")
    p.add_argument("--trace", action="store_true", help="print the GPU kernels of one profile by time")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row, after a warm-up; the median is shown")
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats {a.repeats}: give 1 or more")
    need_gpu("bench/profiling.py")
    with cli_errors():
        model = random_model(SHAPES[a.model], "cuda") if a.model in SHAPES else load_model(a.model, "cuda")[0]
        if a.checkpoint or a.model == "llama3-8b":
            # transformers recomputes a layer only in training mode (no dropout in these models)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        profile_bench(model, a.length, a.reference, a.launch, a.plan, not a.no_train, a.trace, a.repeats)
