"""Diagnostic: does the calibration seed move the profile's ranking of the KV heads? (bench/README.md#quality)
For each seed: the calibration samples at one length (`moa.make_samples`, as `compress` makes them) and their
influence histogram (`moa.profile`), saved as OUT/h_SEED_SAMPLES[_MIX].pt and reused when present; then, for every
pair of seeds and for pairs of two-seed sums (twice the samples), the Spearman correlation of the KV heads' profiled
losses under the uniform 0.5 rule, the overlap of the top `--top` heads, and the ranks of `--heads` (layer.kv_head).
Run: python examples/smollm2-135m-instruct/diagnostics/profile_seeds.py OUT [--seeds 0 1 2 3] [--samples 16]
     [--length 1024] [--device cpu] [--instructions quote quote question summary]
     [--gpu-profile DIR/profile_1024.pt] [--front DIR PLAN.json] [--plain] [--versus OUT2/h_0_16.pt ...]
--plain: the samples without the chat template (the frame moa.chat_frame uses for a tokenizer without one), saved as
h_SEED_SAMPLES[_MIX]_plain.pt; --versus: each seed against other runs' h_*.pt (another mix or frame).
--front: each of that run's Pareto plans' profiled loss F at the length, from the seeds' mean histogram (and from
DIR's own profile), beside its validation loss there (what the optimizer sees against what the model does).
"""
import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import moa

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
p.add_argument("--samples", type=int, default=16)
p.add_argument("--length", type=int, default=1024)
p.add_argument("--device", default="cpu")
p.add_argument("--instructions", nargs="+", help="the calibration mix, as moa.py --instructions (default: moa's)")
p.add_argument("--top", type=int, default=38, help="heads compared at the top (38: whole 1k windows in plan_d50)")
p.add_argument("--heads", nargs="+", default=["20.1", "20.2"])
p.add_argument("--gpu-profile", help="a run's profile_N.pt (e.g. the H200 run behind plan_d50.json) to compare too")
p.add_argument("--plain", action="store_true", help="frame the samples without the chat template")
p.add_argument("--versus", nargs="+", default=[], help="h_*.pt files of this script to compare each seed with")
p.add_argument("--front", nargs=2, metavar=("DIR", "PLAN"), help="a run's folder (optimize.pt, profile_N.pt) and plan")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
model = tokenizer = None
hist = {}
for seed in a.seeds:
    path = out / f"h_{seed}_{a.samples}{'_' + '-'.join(a.instructions) if a.instructions else ''}{'_plain' if a.plain else ''}.pt"
    if not path.is_file():
        if model is None:
            model, tokenizer = moa.load_model(None, a.device)
            if a.plain:
                tokenizer.chat_template = None      # moa.chat_frame's frame for a tokenizer without one
        mix = dict(instructions=tuple(a.instructions)) if a.instructions else {}
        cfg = moa.Config(seed=seed, samples=a.samples, **mix).resolved(model.device, model.config)
        docs = moa.tokenize_documents(tokenizer, moa.split_documents(moa.load_documents(None), seed)[0])
        samples = moa.make_samples(model, tokenizer, docs, a.samples, a.length, cfg, seed=[seed, a.length, False])
        torch.save({"hist": moa.profile(model, samples, cfg.sink), "instruction": samples["instruction"],
                    "rise": samples["rise"]}, path)
    hist[seed] = torch.load(path)["hist"]
G = moa.kv_heads(moa.AutoConfig.from_pretrained(moa.model_folder(None)))[1]
alpha, beta = moa.uniform_rule(0.5, a.length)
lost = lambda h: moa.rule_losses(h, h.shape[1] // G, np.array([alpha]), np.array([beta]))[:, 0]   # [L * G]
heads = [int(layer) * G + int(kv) for layer, kv in (h.split(".") for h in a.heads)]


def compare(name, x, y):
    lx, ly = lost(x), lost(y)
    rank = lambda v: np.argsort(np.argsort(-v, kind="stable"))
    top = lambda v: set(np.argsort(-v, kind="stable")[:a.top].tolist())
    ranks = ", ".join(f"{h}: {rank(lx)[k]} / {rank(ly)[k]}" for h, k in zip(a.heads, heads))
    print(f"{name:<28} spearman {spearmanr(lx, ly)[0]:.3f}  top-{a.top} overlap {len(top(lx) & top(ly)):>3}  "
          f"ranks {ranks}")


print(f"KV heads' profiled loss at N = {a.length} under the uniform 0.5 rule, {a.samples} samples a seed, mix "
      f"{' '.join(a.instructions or moa.INSTRUCTIONS)}, {'plain frame' if a.plain else 'chat template'}")
for s, t in itertools.combinations(a.seeds, 2):
    compare(f"seed {s} vs {t}", hist[s], hist[t])
for (s, t), (u, v) in itertools.combinations(itertools.combinations(a.seeds, 2), 2):
    if not {s, t} & {u, v}:
        compare(f"seeds {s}+{t} vs {u}+{v}", hist[s] + hist[t], hist[u] + hist[v])
if a.gpu_profile:
    g = moa.Stages.read(Path(a.gpu_profile))["value"]
    for s in a.seeds:
        compare(f"{Path(a.gpu_profile).name} vs seed {s}", g, hist[s])
for f in a.versus:
    for s in a.seeds:
        compare(f"{Path(f).name} vs seed {s}", torch.load(f)["hist"], hist[s])
if a.front:
    run, plan = Path(a.front[0]), __import__("json").load(open(a.front[1]))
    ra, rb = moa.rules(plan["lengths"])
    front = moa.Stages.read(run / "optimize.pt")["value"]
    v = plan["validation_loss"]
    col = v["lengths"].index(a.length)
    F = lambda h: [moa.rule_losses(h, h.shape[1] // G, ra, rb)[np.arange(len(x)), x].sum() for x in front]
    own, ours = F(moa.Stages.read(run / f"profile_{a.length}.pt")["value"]), F(sum(hist.values()) / len(hist))
    print(f"\nthe Pareto plans of {run}: F at {a.length} from its profile and from seeds {a.seeds} averaged, "
          f"validation loss at {a.length}")
    for i, (f, g) in enumerate(zip(own, ours)):
        print(f"plan {i:2d} F {f:.3f}  F seeds {g:.3f}  loss {v['pareto'][i][col]:.4f}")
