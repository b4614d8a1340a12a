"""
The optimizer's cost on a Llama-3-70B-shaped problem (80 layers x 8 KV heads x 54 rules): the whole Pareto front
(SPEC §6) next to one naive single-objective milp.
Run:  python bench/milp.py [--workers 2]
      python bench/milp.py --stages DIR [--workers 1 2 8]   (the front of a pipeline's saved dense profiles)
"""
import argparse
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # moa.py and kernel.py live one folder up

import numpy as np
from scipy import sparse
from scipy.optimize import LinearConstraint, milp

from moa import SINK, Config, Stages, budget_lengths, cache_size, pareto_front, rule_densities, rule_losses, rules, \
    solve, window

def synthetic(n_layers=80, heads=8, lengths=(1024, 2048, 4096), seed=0):
    """A profiled-looking problem: each head's distance histogram hist[δ] = a (δ+1)^-p with a few long-distance bumps
    and noise per length, loss = its suffix sums at the rules' windows (SPEC §5). Returns loss [K, 54, P],
    density [54, P+1] (the validation length 2·max(lengths) last), layers [K]."""
    rng = np.random.default_rng(seed)
    K, n = n_layers * heads, max(lengths)
    alpha, beta = rules(lengths)
    delta = np.arange(n)
    hist = rng.lognormal(0, 1, (K, 1)) * (delta + 1.0) ** -rng.uniform(0.5, 2.0, (K, 1))
    bump = rng.random(K) < 0.1
    hist[bump] += 1e-2 * hist[bump, :1] * np.exp(-0.5 * ((delta - rng.uniform(500, 3500, (bump.sum(), 1))) / 200) ** 2)
    loss = []
    for N in lengths:
        h = hist[:, :N] * rng.lognormal(0, 0.3, (K, N))
        suffix = np.hstack([np.cumsum(h[:, ::-1], 1)[:, ::-1], np.zeros((K, 1))])  # suffix[:, w] = Σ_{δ>=w} h[δ]
        loss.append(suffix[:, window(alpha, beta, N)])
    budget_lengths = np.array([*lengths, 2 * n])
    density = cache_size(alpha[:, None], beta[:, None], budget_lengths) / budget_lengths
    return np.stack(loss, -1), density, np.repeat(np.arange(n_layers), heads)


def milp_bench(workers=2):
    """The whole Pareto front of a Llama-3-70B-shaped synthetic problem (80 layers x 8 KV heads x 54 rules, 3
    profiling lengths, budget 0.5 at 4 lengths) next to one naive single-objective milp. Prints the timings."""
    loss, density, layers = synthetic()
    K, R, P = loss.shape
    budget = np.full(density.shape[1], 0.5)
    t = time.perf_counter()
    front = pareto_front(loss, density, budget, workers=workers)
    seconds, solves = time.perf_counter() - t, P + P * 4 ** (P - 1)
    ok = all((density[x].mean(0) <= budget + 1e-12).all() for x in front)
    print(f"Pareto front ({workers} threads): {solves} solves in {seconds:.1f} s ({seconds / solves:.2f} s a solve), "
          f"{len(front)} plans, every budget met: {ok}")
    t = time.perf_counter()
    x = solve(loss, density, budget, P - 1)
    print(f"one solve, F_4096: {time.perf_counter() - t:.2f} s, F = {loss[np.arange(K), x, P - 1].sum():.8g}")
    t = time.perf_counter()
    c = loss[:, :, P - 1].ravel()
    naive = milp(c, integrality=np.ones_like(c), bounds=(0, 1), constraints=[
        LinearConstraint(sparse.kron(sparse.eye_array(K), np.ones((1, R))), 1, 1),
        LinearConstraint(np.tile(density.T, (1, K)), -np.inf, budget * K)])
    print(f"the same solve as one naive milp: {time.perf_counter() - t:.2f} s, F = {naive.fun:.8g}")


def saved_problem(out, groups, validate_length, density=0.5):
    """The optimizer's problem from a pipeline's saved dense profiles (OUT/profile_<N>.pt, every length N found) under
    the density budget at those lengths and `validate_length`, as compress states it.
    Returns (lengths, loss [L * G, 54, P], densities [54, M], budget [M], budget lengths [M], layers [L * G])."""
    lengths = sorted(int(f.stem[8:]) for f in Path(out).glob("profile_*.pt") if f.stem[8:].isdigit())
    if not lengths:
        sys.exit(f"error: no profile_<N>.pt in {out}: give a folder that python moa.py --out wrote")
    hists = [Stages.read(Path(out) / f"profile_{n}.pt")["value"] for n in lengths]          # [L, H, N] each
    alphas, betas = rules(lengths)
    loss = np.stack([rule_losses(h, groups, alphas, betas) for h in hists], -1)                # [L * G, 54, P]
    at = budget_lengths(Config(lengths=tuple(lengths), validate_length=validate_length))
    layers = np.repeat(np.arange(hists[0].shape[0]), hists[0].shape[1] // groups)           # [L * G]
    return lengths, loss, rule_densities(alphas, betas, at, SINK), np.full(len(at), density), at, layers


def stages_bench(out, workers, groups, validate_length):
    """The Pareto front of a pipeline's saved dense profiles (saved_problem), timed once for each thread count in
    `workers`."""
    lengths, loss, densities, budget, at, layers = saved_problem(out, groups, validate_length)
    for w in workers:
        t = time.perf_counter()
        front = pareto_front(loss, densities, budget, layers, names=at, workers=w)
        print(f"{len(loss)} KV heads, lengths {lengths}: the front in {time.perf_counter() - t:.1f} s with {w} "
              f"threads, {len(front)} plans")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="bench/milp.py")
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--stages", help="a pipeline's --out folder: time the front of its saved profiles instead")
    p.add_argument("--groups", type=int, default=3, help="query heads per KV head (default: SmolLM2's 3)")
    p.add_argument("--validate-length", type=int, default=8192, help="the run's (default: SmolLM2's GPU default)")
    a = p.parse_args()
    stages_bench(a.stages, a.workers, a.groups, a.validate_length) if a.stages else milp_bench(a.workers[0])
