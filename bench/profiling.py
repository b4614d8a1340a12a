"""
Profiling's cost (SPEC §5) at one length on a GPU: time and peak memory of a plain forward+backward next to
profiling one sample. (Named profiling.py, not profile.py, which would shadow Python's own profile module.)
Run:  python bench/profiling.py [--model M] [--length 8192]
"""
import argparse
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # moa.py and kernel.py live one folder up

import torch

from moa import cli_errors, load_model, profile

def profile_bench(model, n=8192):
    """Time and peak GPU memory at length n of a plain forward+backward (SDPA, loss over every token, weight
    gradients) and of profiling one sample (SPEC §5). Prints a table."""
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
    sample = {"input_ids": ids, "answer_start": torch.tensor([n - 128])}

    def plain():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    print(f"{'length ' + str(n):<22} {'seconds':>8} {'peak GiB':>9}")
    for name, fn in (("plain forward+backward", plain), ("profiling", lambda: profile(model, sample))):
        fn()                                                        # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(f"{name:<22} {time.perf_counter() - t0:>8.2f} {torch.cuda.max_memory_allocated() / 2**30:>9.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/profiling.py")
    p.add_argument("--model", help="a model as in moa.py --model (default: the embedded SmolLM2)")
    p.add_argument("--length", type=int, default=8192)
    a = p.parse_args()
    with cli_errors():
        profile_bench(load_model(a.model, "cuda")[0], a.length)
