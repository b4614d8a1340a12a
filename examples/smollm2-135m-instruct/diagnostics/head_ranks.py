"""Diagnostic: which KV heads a run's plans give a whole window, against what the profile says of them
(bench/README.md#quality). On the stages that `python moa.py --model M --out DIR` left in DIR and its plan file:
1. the KV heads ranked by their profiled loss at --length under the uniform rule of --density (what a head loses when
   it sees only part of the input), the plan's whole windows marked *;
2. every Pareto plan of the run (DIR/optimize.pt): its profiled loss F at each profiling length (what the optimizer
   sees), its validation losses and their shares of uniform's excess (from the plan file: what the model does), its
   count of whole windows at 1k, 2k and 8k, and which of --heads (layer.kv_head) see all of 1k / 2k.
Run: python examples/smollm2-135m-instruct/diagnostics/head_ranks.py DIR PLAN.json [--length 1024] [--density 0.5]
     [--heads 20.0 20.1 20.2]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import moa

p = argparse.ArgumentParser()
p.add_argument("dir", type=Path)
p.add_argument("plan")
p.add_argument("--length", type=int, default=1024)
p.add_argument("--density", type=float, default=0.5)
p.add_argument("--heads", nargs="+", default=["20.0", "20.1", "20.2"])
a = p.parse_args()
plan = json.load(open(a.plan))
alphas, betas = np.array(plan["alphas"]), np.array(plan["betas"])            # [L, G]
L, G = alphas.shape
hist = moa.Stages.read(a.dir / f"profile_{a.length}.pt")["value"]             # [L, H, N]
alpha, beta = moa.uniform_rule(a.density, a.length)
lost = moa.rule_losses(hist, hist.shape[1] // G, np.array([alpha]), np.array([beta]))[:, 0]   # [L * G]
whole = (moa.window(alphas, betas, a.length) >= a.length).ravel()
print(f"1. KV heads by profiled loss at N = {a.length} under the uniform {a.density} rule; * = whole window in the "
      f"plan ({whole.sum()} of {L * G})")
for rank, k in enumerate(np.argsort(-lost, kind="stable")):
    print(f"{rank:3d} layer {k // G:2d} KV head {k % G}  {lost[k]:.4f} {'*' if whole[k] else ''}")

front = moa.Stages.read(a.dir / "optimize.pt")["value"]                       # rule index per KV head, per plan
v = plan["validation_loss"]
share = (np.divide(v["pareto"], v["dense"]) - 1) / (np.divide(v["uniform"], v["dense"]) - 1)   # [plans, lengths]
ra, rb = moa.rules(plan["lengths"])
profiled = np.stack([moa.rule_losses(moa.Stages.read(a.dir / f"profile_{n}.pt")["value"], hist.shape[1] // G, ra, rb)
                     for n in plan["lengths"]], -1)                                        # [L * G, 54, lengths]
heads = [int(layer) * G + int(kv) for layer, kv in (h.split(".") for h in a.heads)]
print(f"\n2. the Pareto plans: profiled F at {plan['lengths']}; validation loss and share of uniform's excess at "
      f"{v['lengths']}; whole windows at 1k / 2k / 8k; which of {' '.join(a.heads)} see all of 1k / 2k (W)")
for i, x in enumerate(front):
    w = {n: moa.window(ra[x], rb[x], n) >= n for n in (1024, 2048, 8192)}
    mark = lambda n: "".join("W" if w[n][k] else "." for k in heads)
    F = profiled[np.arange(L * G), x].sum(0)
    print(f"plan {i:2d} F {np.round(F, 3).tolist()!s:<28} loss {np.round(v['pareto'][i], 4).tolist()!s:<18} "
          f"share {np.round(share[i], 3).tolist()!s:<17} whole {w[1024].sum():2d} / {w[2048].sum():2d} / "
          f"{w[8192].sum():2d}  {mark(1024)} / {mark(2048)}")
