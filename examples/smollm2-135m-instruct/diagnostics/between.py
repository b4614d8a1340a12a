"""Diagnostic: plans between the two ends of the Pareto front (bench/README.md#quality).
On the stages that `python moa.py --model M --out DIR` left in DIR: minimise the profiled loss F at the longest
validation length with F at the shortest bounded at LEVELS levels between the two anchors, and the reverse; validate
each new plan at the validation lengths; print every plan's shares of uniform's excess (the front's own and the new
ones); write the best by moa.validation_score, and the best at each end with the other end's share <= 0.5, to OUT.
Run: python examples/smollm2-135m-instruct/diagnostics/between.py M DIR OUT [device]  (M: the model, as moa.py --model)
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import moa

LEVELS = 16
M, DIR, OUT = (sys.argv[1] or None), Path(sys.argv[2]), Path(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "auto"
OUT.mkdir(parents=True, exist_ok=True)
model, tokenizer = moa.load_model(M, device)
plan0 = json.load(open(DIR / "plan.json"))
cfg = moa.Config(lengths=tuple(plan0["lengths"]), validate_length=plan0["validate_length"],
                 density=plan0["density_budget"], samples=plan0["samples"]).resolved(model.device, model.config)
H, G = moa.kv_heads(model.config)
L = model.config.num_hidden_layers
K = L * G
alphas, betas = moa.rules(cfg.lengths)
read = lambda name: moa.Stages.read(DIR / f"{name}.pt")["value"]
loss = np.stack([moa.rule_losses(read(f"profile_{n}"), H // G, alphas, betas) for n in cfg.lengths], -1)
at = moa.budget_lengths(cfg)
density = moa.rule_densities(alphas, betas, at, cfg.sink)
budget = np.full(len(at), cfg.density)
layers = np.repeat(np.arange(L), G)
v = plan0["validation_loss"]
vl, dense, uniform = v["lengths"], v["dense"], v["uniform"]
front = [np.asarray(x) for x in read("optimize")]
P = loss.shape[-1]
lo, hi = 0, P - 1                                    # the shortest and the longest profiling length
F = lambda x: loss[np.arange(K), x].sum(0)           # [P]
solve = lambda obj, bound_at, b: moa.solve(loss, density, budget, obj,
                                           np.where(np.arange(P) == bound_at, b, np.inf), layers)
a_lo, a_hi = moa.solve(loss, density, budget, lo, None, layers), moa.solve(loss, density, budget, hi, None, layers)
new = []
for obj, other, a, b in ((hi, lo, a_lo, a_hi), (lo, hi, a_hi, a_lo)):
    for bound in np.linspace(F(a)[other], F(b)[other], LEVELS + 2)[1:-1]:
        x = solve(obj, other, bound)
        if x is not None:
            new.append(x)
known = {tuple(x) for x in front}
new = [np.array(x) for x in dict.fromkeys(map(tuple, new)) if x not in known]   # distinct, not on the front, in order
print(f"front {len(front)} plans, {len(new)} new plans between the ends")
valid = {n: read(f"samples_valid{n}") for n in vl}
X, plans, losses = front + new, [], []
for i, x in enumerate(X):
    p = moa.make_plan(alphas[x].reshape(L, G), betas[x].reshape(L, G), cfg.sink,
                      validate_length=cfg.validate_length)
    plans.append(p)
    if i < len(front):
        losses.append(v["pareto"][i])
    else:
        losses.append([float(moa.answer_losses(model, valid[n], p).mean()) for n in vl])
share = (np.divide(losses, dense) - 1) / np.maximum(np.divide(uniform, dense) - 1, moa.MIN_SPREAD)
score = np.array([moa.validation_score(x, dense, uniform) for x in losses])
for i in np.argsort(score):
    tag = "front" if i < len(front) else "new"
    print(f"{tag:>5} {i:3d} F {np.round(F(X[i]), 3)} "
          f"loss {np.round(losses[i], 4)} share {np.round(share[i], 3)} score {score[i]:.3f}")
picks = {"best": int(np.argmin(score))}
for end, name in ((0, "short"), (len(vl) - 1, "long")):
    ok = [i for i in range(len(plans)) if share[i, len(vl) - 1 - end] <= 0.5]
    if ok:
        picks[name] = min(ok, key=lambda i: share[i, end])
print("picks", picks)
for name, i in picks.items():
    plans[i].update(validation_loss={"lengths": vl, "dense": dense, "uniform": uniform, "plan": losses[i],
                                     "score": float(score[i])}, lengths=list(cfg.lengths),
                    density_budget=cfg.density)
    moa.save_plan(plans[i], OUT / f"plan_between_{name}.json")
