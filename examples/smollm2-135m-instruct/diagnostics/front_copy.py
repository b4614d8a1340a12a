"""Issue 4 diagnostic: copy accuracy of every Pareto plan (not only the validated one), dense and uniform."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
import numpy as np, torch, moa
out = sys.argv[1] if len(sys.argv) > 1 else "runs/front50"
model, tok = moa.load_model(os.environ.get("GGUF"), "cuda", "bfloat16")
t = time.time()
best = moa.compress(model, tok, out=out, density=0.5, samples=32)
print(f"pipeline {time.time() - t:.0f}s")
front = torch.load(out + "/optimize.pt", weights_only=False)["value"]
L, (H, G) = model.config.num_hidden_layers, moa.kv_heads(model.config)
alphas, betas = moa.rules((1024, 2048, 4096))
plans = [moa.make_plan(alphas[c].reshape(L, G), betas[c].reshape(L, G)) for c in front]
vl = best["validation_loss"]["pareto"]
_, docs = moa.split_documents(moa.load_documents(), 0)
inputs = {}
for n in (1024, 2048, 4096):
    rng = np.random.default_rng([0, n])
    inputs[n] = torch.cat([moa.copy_inputs(tok, docs, n, z, 8, rng) for z in moa.DEPTHS])
acc = lambda p, n: moa.copy_accuracy(model, inputs[n], p).mean().item()
with torch.no_grad():
    dense = {n: acc(None, n) for n in inputs}
    print("dense", {n: round(v, 3) for n, v in dense.items()})
    uni = {n: acc(moa.uniform_plan(model.config, 0.5, n), n) for n in inputs}
    print("uniform", {n: round(v, 3) for n, v in uni.items()})
    print(f"{'plan':>4} {'val8k':>7} " + " ".join(f"{n:>6}" for n in inputs) + "  win(18,2)@1k/2k/4k  chosen")
    for i, p in enumerate(plans):
        a = {n: acc(p, n) for n in inputs}
        w = [int(moa.window(np.array(p['alphas'][18][2]), np.array(p['betas'][18][2]), n)) for n in inputs]
        print(f"{i:>4} {vl[i]:.4f} " + " ".join(f"{a[n] / dense[n]:6.2f}" for n in inputs) + f"  {w}  {'*' if p['alphas'] == best['alphas'] and p['betas'] == best['betas'] else ''}")
