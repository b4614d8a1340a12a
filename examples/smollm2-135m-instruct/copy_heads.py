"""Which KV heads carry copy retrieval, and how the calibration profile and the shipped 0.5 plan treat them.
Run from the repository root on a CPU: python examples/smollm2-135m-instruct/copy_heads.py 1024   (or 2048)
Profiles the embedded SmolLM2 (float32) on 2 calibration samples and on 2 copy-retrieval inputs (the answer being the
repeated segment), ranks the KV heads by first-order influence at distances >= 256, and prints the comparison."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import moa  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
model, tokenizer = moa.load_model(None, "cpu", "float32")
calibration_docs, held_out_docs = moa.split_documents(moa.load_documents(), 0)
calibration = moa.make_samples(model, tokenizer, moa.tokenize_documents(tokenizer, calibration_docs), 2, n,
                               moa.Config(samples=2), seed=[0, n, False])
rng = np.random.default_rng(1)
ids = torch.cat([moa.copy_inputs(tokenizer, held_out_docs, n, depth, 1, rng) for depth in (0.3, 0.5)])
copy = {"input_ids": ids, "answer_start": torch.full((2,), n - (moa.SEGMENT - moa.CUE))}
plan = moa.load_plan(Path(__file__).parent / "plan_d50.json")
windows = moa.window(*moa.kv_rules(plan, model.config), n).ravel()                      # [L * G]
H, G = moa.kv_heads(model.config)
far = {}
for name, samples in (("calibration", calibration), ("copy", copy)):
    hist = moa.profile(model, samples).double()                                         # [L, H, N]
    hist = hist.reshape(len(hist), G, H // G, n).sum(2).reshape(-1, n)                  # [L * G, N] per KV head
    dropped = sum(hist[k, int(w):].sum() for k, w in enumerate(windows)) / hist.sum()
    far[name] = (hist[:, 256:].sum(1) / hist.sum()).numpy()
    print(f"{name}: share of influence at distance >= 256: {far[name].sum():.3f}; dropped by the 0.5 plan: {dropped:.3f}")
rank = lambda x: np.argsort(np.argsort(-x))
top = np.argsort(-far["copy"])[:10]
print("rank correlation, calibration vs copy: %.2f" % np.corrcoef(rank(far["calibration"]), rank(far["copy"]))[0, 1])
print(f"{'layer':>5} {'head':>4} {'copy rank':>9} {'calibration rank':>16} {'plan window':>11}")
for k in top:
    print(f"{k // G:>5} {k % G:>4} {rank(far['copy'])[k] + 1:>9} {rank(far['calibration'])[k] + 1:>16} {int(windows[k]):>11}")
