"""How many heads' rules the optimizer changes when a pipeline's dense profiles change by a tiny relative noise:
the Pareto front (SPEC §6) of the saved profiles, then of the profiles times (1 + eps * z), z standard normal; for each
plan of the first front, the plan of the second that differs from it in the fewest heads.
Run from the repository root:  python examples/smollm2-135m-instruct/diagnostics/near_ties.py DIR VALIDATE_LENGTH"""
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
from bench.milp import saved_problem
from moa import pareto_front

warnings.filterwarnings("ignore", "solve: objective")       # node-limit notes: the kept plan is what is compared
out, validate_length = Path(sys.argv[1]), int(sys.argv[2])
groups = 3 if len(sys.argv) < 4 else int(sys.argv[3])                                   # SmolLM2: 9 / 3
lengths, loss, density, budget, at, layers = saved_problem(out, groups, validate_length)
front = lambda x: np.array(pareto_front(x, density, budget, layers, names=at, workers=8))   # [plans, L * G]
base = front(loss)
F = lambda x: loss[np.arange(x.shape[-1]), x].sum(-2)                                     # [plans, P]
print(f"{out}: lengths {lengths}, budget lengths {list(at)}; {len(base)} plans on the front of the saved profiles")
rng = np.random.default_rng(0)
for eps in (1e-7, 1e-4, 1e-2):
    other = front(loss * (1 + eps * rng.standard_normal(loss.shape)))
    changed = (base[:, None] != other[None]).sum(-1)                                      # [base plans, other plans]
    near = changed.argmin(1)
    gain = F(other[near]) / F(base) - 1                                                    # [base plans, P]
    print(f"relative noise {eps:g}: {len(other)} plans; heads on another rule in the nearest plan, per plan of the "
          f"first front: median {np.median(changed.min(1)):.0f}, min {changed.min()}, max {changed.min(1).max()} of "
          f"{base.shape[1]}; its F against the first plan's, largest change at any length {np.abs(gain).max():.2%}")
