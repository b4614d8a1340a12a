"""Diagnostic: which of a plan's cut KV heads the plain pass-key format needs at one length (bench/README.md#quality).
On bench/quality.py's passkey_plain prompts (--count per depth, depths 0.3 and 0.5), a key counts as found when
every one of its tokens, appended after the prompt, is the model's top-1 (teacher-forced: what greedy decoding would
state first; the plain prompt ends with "the pass key is", the chat formats' answers need not start with the key, so
this measure suits the plain format only). Prints dense and the plan, then the plan with one layer's KV heads given
the whole input, for each layer the plan cuts; then, for each layer that found more keys, its KV heads one at a
time.
Run: python examples/smollm2-135m-instruct/diagnostics/plain_passkey.py PLAN.json [--length 1024] [--count 4]
     [--model M] [--device cpu]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import moa
sys.path.append(str(Path(__file__).resolve().parents[3] / "bench"))    # after moa: bench/ has a kernel.py too
from quality import passkey_inputs

p = argparse.ArgumentParser()
p.add_argument("plan")
p.add_argument("--length", type=int, default=1024)
p.add_argument("--count", type=int, default=4)
p.add_argument("--model")
p.add_argument("--device", default="auto")
a = p.parse_args()
model, tokenizer = moa.load_model(a.model, a.device)
plan = moa.load_plan(a.plan)
docs = moa.split_documents(moa.load_documents(), 0)[2]
depths, rows = (0.3, 0.5), []
for depth in depths:
    rng = np.random.default_rng([0, a.length, int(depth * 10)])
    ids, keys = passkey_inputs(tokenizer, docs, a.length, depth, a.count, rng, 16, "passkey_plain")
    for prompt, key in zip(ids.tolist(), keys):
        key = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
        rows.append((torch.tensor(prompt + key, device=model.device), len(key)))


@torch.no_grad()
def found(p):
    """Share of keys found at each depth."""
    hits = []
    with moa.following(model, p):
        for x, m in rows:
            logits = model(x[None], logits_to_keep=m + 1).logits[0, :-1]
            hits.append(float((logits.argmax(-1) == x[-m:]).all()))
    return " / ".join(f"{np.mean(hits[i * a.count:(i + 1) * a.count]):.2f}" for i in range(len(depths)))


alphas, betas = np.array(plan["alphas"]), np.array(plan["betas"])
cut = moa.window(alphas, betas, a.length) < a.length                      # [L, G]: heads that see part of the input
whole = lambda heads: moa.make_plan(np.where(heads, 0.0, alphas), np.where(heads, 1.0, betas), plan["sink"])
print(f"passkey_plain at {a.length}, {a.count} prompts per depth, keys found at depths {' / '.join(map(str, depths))}")
base = found(plan)
print(f"dense {found(None)}; plan {base} ({int(cut.sum())} of {cut.size} KV heads cut at {a.length})")
helped = []
for layer in np.nonzero(cut.any(1))[0]:
    heads = np.zeros_like(cut)
    heads[layer] = True
    result = found(whole(heads))
    print(f"layer {layer:2d}'s {int(cut[layer].sum())} cut heads whole: {result}", flush=True)
    if result != base:
        helped.append(layer)
for layer in helped:
    for g in np.nonzero(cut[layer])[0]:
        heads = np.zeros_like(cut)
        heads[layer, g] = True
        print(f"layer {layer} KV head {g} whole: {found(whole(heads))}", flush=True)
