"""Diagnostic: what the profile at a plan (SPEC §5.1) predicts for the solves near a run's first choice, against what
validation measures (bench/README.md#quality). On the stages that `python moa.py --out DIR` left in DIR (its plans,
validation samples, and its dense and at-plan profiles), the first refinement round's near plans are solved from
three ratings of each rule relative to the front's choice:
  signed: the at-plan profile alone, as SPEC §5.1 writes it (signed drop and restore estimates);
  blend:  what moa.py uses: the dense profile's |ΔL| for a rule that cuts a head below the plan, the at-plan restore
          estimate for one that widens it;
  dense:  the dense profile alone.
Each plan: the heads it changes, its predicted change of the weighted objective (units of uniform's F, negative:
better) and its measured validation score (0: dense, 1: uniform), the front's choice beside. Then, for the signed
rating's plans, the predicted change of the heads they cut and of those they widen, by the at-plan and the dense
profile.
Run: python examples/smollm2-135m-instruct/diagnostics/at_plan.py DIR [--model M] [--device cpu]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import moa

p = argparse.ArgumentParser()
p.add_argument("dir", type=Path)
moa.model_flags(p)
a = p.parse_args()
plan, front = moa.load_plan(a.dir / "plan.json"), moa.load_plan(a.dir / "plan_front.json")
lengths, sink, v = plan["lengths"], plan["sink"], plan["validation_loss"]
alphas, betas = moa.rules(lengths)
L, G = np.array(plan["alphas"]).shape
K = L * G
choice = np.array([np.flatnonzero(np.isclose(alphas, x) & np.isclose(betas, y))[0]
                   for x, y in zip(np.ravel(front["alphas"]), np.ravel(front["betas"]))])        # rule per KV head
read = lambda name: moa.Stages.read(a.dir / f"{name}.pt")["value"]
hists = [read(f"profile_{n}") for n in lengths]
groups = hists[0].shape[1] // G
dense = np.stack([moa.rule_losses(h, groups, alphas, betas) for h in hists], -1)               # [K, 54, P]
windows = np.stack([moa.window(alphas, betas, n) for n in lengths], -1)                         # [54, P]
at_plan = np.stack([moa.rule_losses(read(f"profile_{n}_at_{moa.fingerprint(windows[choice, p].tolist())}"), groups,
                                    alphas, betas, windows[choice, p]) for p, n in enumerate(lengths)], -1)
from_dense = dense - dense[np.arange(K), choice][:, None]
cut = windows[None] < windows[choice][:, None]                                                  # [K, 54, P]
ratings = {"signed": at_plan, "blend": np.where(cut, from_dense, at_plan), "dense": from_dense}
weights = 1 / np.array([moa.rule_losses(h, groups, *np.array([moa.uniform_rule(plan["density_budget"], n, sink)]).T)
                        .sum() for h, n in zip(hists, lengths)])
at = moa.budget_lengths(moa.Config(lengths=tuple(lengths), validate_length=plan["validate_length"]))
density, budget = moa.rule_densities(alphas, betas, at, sink), np.full(len(at), plan["density_budget"])
model, _ = moa.load_model(a.model, a.device, a.dtype, a.device_map)
valid = {n: read(f"samples_valid{n}") for n in v["lengths"]}


def score(c):   # the validation score of a rule per head, and its losses at the validation lengths
    x = [float(moa.answer_losses(model, valid[n], moa.make_plan(alphas[c].reshape(L, G), betas[c].reshape(L, G),
                                                                 sink)).mean()) for n in v["lengths"]]
    return moa.validation_score(x, v["dense"], v["uniform"]), x


print(f"front's choice: score {moa.validation_score(v['steps']['front'], v['dense'], v['uniform']):.4f}, losses "
      f"{np.round(v['steps']['front'], 4).tolist()} at {v['lengths']} (dense {np.round(v['dense'], 4).tolist()}, "
      f"uniform {np.round(v['uniform'], 4).tolist()})")
for name, relative in ratings.items():
    for c in moa.near_plans(relative, weights, choice, density, budget,
                            np.repeat(np.arange(L), G), None, at, 2):
        changed = np.flatnonzero(c != choice)
        s, x = score(c)
        predicted = (relative[changed, c[changed]] * weights).sum()
        print(f"{name:>6}: {len(changed):2d} heads changed, predicted {predicted:+.4f}, measured score {s:.4f}, "
              f"losses {np.round(x, 4).tolist()}", flush=True)
        if name == "signed":
            for part, heads in (("cut", cut[changed, c[changed], -1]), ("widened", ~cut[changed, c[changed], -1])):
                k = changed[heads]
                print(f"        {heads.sum():2d} heads {part} (at {lengths[-1]}): predicted "
                      f"{(at_plan[k, c[k]] * weights).sum():+.4f} at the plan, "
                      f"{(from_dense[k, c[k]] * weights).sum():+.4f} by the dense profile")
