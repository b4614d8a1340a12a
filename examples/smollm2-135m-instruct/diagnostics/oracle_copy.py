"""Issue 4 diagnostic: an oracle calibration (profiling on copy-retrieval inputs themselves): can any plan the
optimizer finds at 50% keep >= 95% of dense copy accuracy? Profiled and scored on disjoint inputs."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
import numpy as np, torch, moa
model, tok = moa.load_model(os.environ.get("GGUF"), "cuda", "bfloat16")
L, (H, G) = model.config.num_hidden_layers, moa.kv_heads(model.config)
lengths = (1024, 2048, 4096)
calib, docs = moa.split_documents(moa.load_documents(), 0)
def copy_set(n, per_depth, seed, d):
    rng = np.random.default_rng(seed)
    return torch.cat([moa.copy_inputs(tok, d, n, z, per_depth, rng) for z in moa.DEPTHS])
alphas, betas = moa.rules(lengths)
loss = []
for n in lengths:   # profile on copy inputs built from the calibration documents (answer = the repeated segment)
    ids = copy_set(n, 4, [7, n], calib)
    hist = moa.profile(model, {"input_ids": ids, "answer_start": torch.full((len(ids),), n - (moa.SEGMENT - moa.CUE))})
    loss.append(moa.rule_losses(hist, H // G, alphas, betas))
loss = np.stack(loss, -1)
budget_lengths = list(lengths) + [8192]
density = moa.rule_densities(alphas, betas, budget_lengths)
for d in (0.5, 0.25):
    front = moa.pareto_front(loss, density, np.full(4, d), np.repeat(np.arange(L), G), None, budget_lengths)
    test = {n: copy_set(n, 8, [0, n], docs) for n in lengths}
    with torch.no_grad():
        dense = {n: moa.copy_accuracy(model, test[n], None).mean().item() for n in lengths}
        uni = {n: moa.copy_accuracy(model, test[n], moa.uniform_plan(model.config, d, n)).mean().item() for n in lengths}
        print(f"\ndensity {d}: dense {dense}  uniform/dense " + " ".join(f"{uni[n] / dense[n]:.2f}" for n in lengths))
        for i, c in enumerate(front):
            p = moa.make_plan(alphas[c].reshape(L, G), betas[c].reshape(L, G))
            a = {n: moa.copy_accuracy(model, test[n], p).mean().item() for n in lengths}
            print(f"oracle plan {i:>2}: plan/dense " + " ".join(f"{a[n] / dense[n]:.2f}" for n in lengths))
