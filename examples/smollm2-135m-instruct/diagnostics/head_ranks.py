"""Diagnostic: how far apart the profile puts the KV heads a plan gives a whole window and those it does not
(bench/README.md#quality). Ranks the KV heads by their profiled loss at length N under the uniform rule of density D
(what a head loses when it sees only half of a 1k input, at the defaults) and marks the plan's heads that see all of N.
Run: python examples/smollm2-135m-instruct/diagnostics/head_ranks.py DIR PLAN.json [N] [D]
(DIR: the run's folder, holding profile_N.pt; the model's query heads per KV head are read from the histogram and
the plan.)
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import moa

DIR, PLAN = Path(sys.argv[1]), json.load(open(sys.argv[2]))
N = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
D = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
hist = moa.Stages.read(DIR / f"profile_{N}.pt")["value"]                      # [L, H, N]
alphas, betas = np.array(PLAN["alphas"]), np.array(PLAN["betas"])            # [L, G]
L, G = alphas.shape
a, b = moa.uniform_rule(D, N)
lost = moa.rule_losses(hist, hist.shape[1] // G, np.array([a]), np.array([b]))[:, 0]   # [L * G]
whole = (moa.window(alphas, betas, N) >= N).ravel()                          # sees all N besides the sink
print(f"KV heads by profiled loss at N = {N} under the uniform {D} rule; * = whole window in the plan "
      f"({whole.sum()} of {L * G})")
for rank, k in enumerate(np.argsort(-lost, kind="stable")):
    print(f"{rank:3d} layer {k // G:2d} KV head {k % G}  {lost[k]:.4f} {'*' if whole[k] else ''}")
