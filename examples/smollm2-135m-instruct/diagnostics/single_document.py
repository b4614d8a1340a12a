"""Issue 4 diagnostic: does a sample holding ONE long document (cut at a random offset) instead of several short
pydoc topics in a row give the summary answers a retrieval signal? Profile at 1k/2k/4k with the default summary
instruction, build the Pareto front at 0.5, and score every front plan's copy accuracy on held-out copy inputs."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
import numpy as np, torch, moa
model, tok = moa.load_model(os.environ.get("GGUF"), "cuda", "bfloat16")
L, (H, G) = model.config.num_hidden_layers, moa.kv_heads(model.config)
lengths, samples = (1024, 2048, 4096), 32
cfg = moa.Config(samples=1)
cal_docs, held = moa.split_documents(moa.load_documents(), 0)
cal_ids = moa.tokenize_documents(tok, cal_docs)
alphas, betas = moa.rules(lengths)
rank = lambda x: np.argsort(np.argsort(-x))
loss, t = [], time.time()
for n in lengths:
    room = moa.sample_frame(tok, cal_ids, n, cfg)[2]
    long = [d for d in cal_ids if len(d) >= room]
    rng = np.random.default_rng([0, n])
    parts = []
    for i in range(samples):   # one document per sample, long ones in turn, each cut at a random offset
        d = long[i % len(long)]
        start = int(rng.integers(0, len(d) - room + 1))
        parts.append(moa.make_samples(model, tok, [d[start:start + room]], 1, n, cfg, seed=[i, n]))
    s = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    hist = moa.profile(model, s)
    loss.append(moa.rule_losses(hist, H // G, alphas, betas))
    far = hist.double().reshape(L, G, H // G, n).sum(2).reshape(-1, n)[:, 256:].sum(1).cpu().numpy()
    print(f"n={n}: {len(long)} documents long enough; answer lengths {sorted((n - s['answer_start']).tolist())}; "
          f"far>=256 rank of copy head (18, 2): {int(rank(far)[18 * G + 2]) + 1}/{L * G}")
    if n == 2048:
        for r, a in list(zip(s["input_ids"], s["answer_start"]))[:2]:
            print("   ANSWER:", repr(tok.decode(r[int(a):])[:300]))
loss = np.stack(loss, -1)
print(f"samples + profiles {time.time() - t:.0f}s")
budget_lengths = list(lengths) + [8192]
front = moa.pareto_front(loss, moa.rule_densities(alphas, betas, budget_lengths), np.full(4, 0.5),
                         np.repeat(np.arange(L), G), None, budget_lengths)
test = {}
for n in lengths:
    rng = np.random.default_rng([0, n])
    test[n] = torch.cat([moa.copy_inputs(tok, held, n, z, 8, rng) for z in moa.DEPTHS])
acc = lambda p, n: moa.copy_accuracy(model, test[n], p).mean().item()
with torch.no_grad():
    dense = {n: acc(None, n) for n in lengths}
    uni = {n: acc(moa.uniform_plan(model.config, 0.5, n), n) for n in lengths}
    print("dense", {n: round(v, 3) for n, v in dense.items()}, " uniform/dense",
          " ".join(f"{uni[n] / dense[n]:.2f}" for n in lengths))
    for i, c in enumerate(front):
        p = moa.make_plan(alphas[c].reshape(L, G), betas[c].reshape(L, G))
        w = [int(moa.window(np.array(p["alphas"][18][2]), np.array(p["betas"][18][2]), n)) for n in lengths]
        print(f"front plan {i:>2}: plan/dense " + " ".join(f"{acc(p, n) / dense[n]:.2f}" for n in lengths)
              + f"  window of (18, 2) at 1k/2k/4k {w}")
