"""Profiling, validation and generation with the model split over two GPUs give what one GPU gives (README,
"Families, bad input, interruption, several GPUs").
Run from the repository root on a machine with >= 2 GPUs:
    python examples/multi_gpu.py [--model M] [--length 2048] [--samples 8]
Loads the model in float32 twice, one after the other: on cuda:0 alone, then with its layers split half and half over
cuda:0 and cuda:1 by an explicit device map (device_map="auto" would keep a small model on one GPU). Both profile the
same calibration samples (SPEC §5), pick a plan from their own histograms (SPEC §6, one length), score it on the same
held-out samples (SPEC §7) and generate with it. Prints the largest relative difference of the histograms and of the
rule losses, whether the plans and the generated tokens are equal, the validation losses, the seconds, and the peak
memory each GPU allocated."""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moa  # noqa: E402


def halves(config):
    """A device map putting the first half of the layers on GPU 0 and the rest on GPU 1. The embeddings and lm_head
    (tied in SmolLM2) stay on GPU 0, so the hidden states cross from GPU 0 to 1 and back."""
    L = config.num_hidden_layers
    return {"model.embed_tokens": 0, "model.rotary_emb": 0, "lm_head": 0, "model.norm": 1,
            **{f"model.layers.{i}": 2 * i // L for i in range(L)}}


def run(name, model, samples, valid, prompt, lengths, budget, new_tokens):
    """Profile, plan (density `budget` at both lengths), validate and generate on one placement of the model. Returns
    hist [L, H, N], the rule losses [L*G, 54], the plan, its validation loss, the generated ids [1, P + new_tokens],
    and per GPU the peak GiB allocated."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hist = moa.profile(model, samples)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    H, G = moa.kv_heads(model.config)
    alphas, betas = moa.rules(lengths[:1])
    loss = moa.rule_losses(hist, H // G, alphas, betas)
    density = moa.rule_densities(alphas, betas, lengths)
    choice = moa.pareto_front(loss[:, :, None], density, np.full(len(lengths), budget))[0]
    L = model.config.num_hidden_layers
    plan = moa.make_plan(alphas[choice].reshape(L, G), betas[choice].reshape(L, G), validate_length=lengths[-1])
    valid_loss = float(moa.answer_losses(model, valid, plan).mean())
    with moa.following(model, plan):
        ids = model.generate(prompt.to(model.device), attention_mask=torch.ones_like(prompt).to(model.device),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0).cpu()
    peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
    devices = sorted({str(p.device) for p in model.parameters()})
    print(f"{name}: layers on {', '.join(devices)}; profiling {seconds:.2f} s; plan loss {valid_loss:.6f}; peak GiB "
          + ", ".join(f"cuda:{i} {p:.2f}" for i, p in enumerate(peaks)), flush=True)
    return hist, loss, plan, valid_loss, ids, peaks


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="as moa.py --model (default: the embedded SmolLM2)")
    p.add_argument("--length", type=int, default=2048, help="profiling length")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit(f"this check needs 2 GPUs; torch sees {torch.cuda.device_count()}")
    lengths = [a.length, 2 * a.length]                       # profiling, validation
    one, tokenizer = moa.load_model(a.model, "cuda:0", "float32")
    cfg = moa.Config(samples=a.samples, answer_tokens=64).resolved("cuda", one.config)
    docs = moa.split_documents(moa.load_documents(), 0)
    calib_docs, valid_docs = (moa.tokenize_documents(tokenizer, d) for d in docs)
    samples = moa.make_samples(one, tokenizer, calib_docs, a.samples, lengths[0], cfg, seed=[0, lengths[0], False])
    valid = moa.make_samples(one, tokenizer, valid_docs, a.samples, lengths[1], cfg, seed=[0, lengths[1], True])
    prompt = valid["input_ids"][:1, :lengths[0]]
    results = [run("one GPU", one, samples, valid, prompt, lengths, cfg.density, a.new_tokens)]
    del one
    torch.cuda.empty_cache()
    path = moa.model_folder(a.model)
    split, _ = moa.load_model(path, "cuda", "float32", device_map=halves(AutoConfig.from_pretrained(path)))
    results.append(run("two GPUs", split, samples, valid, prompt, lengths, cfg.density, a.new_tokens))
    (h1, l1, p1, v1, g1, m1), (h2, l2, p2, v2, g2, m2) = results
    print(f"histograms [L, H, N] = {list(h1.shape)}: max |difference| / max |one GPU| = "
          f"{float((h1 - h2).abs().max() / h1.abs().max()):.3e}")
    print(f"rule losses [L*G, 54]: max |difference| / max |one GPU| = {np.abs(l1 - l2).max() / np.abs(l1).max():.3e}")
    print(f"same plan: {p1 == p2}; validation loss @{lengths[1]}: one GPU {v1:.6f}, two GPUs {v2:.6f}, "
          f"difference {abs(v1 - v2):.2e}")
    print(f"same {a.new_tokens} generated tokens: {torch.equal(g1, g2)}")
    print("peak GiB allocated, one GPU: " + ", ".join(f"cuda:{i} {m:.2f}" for i, m in enumerate(m1)) +
          "; two GPUs: " + ", ".join(f"cuda:{i} {m:.2f}" for i, m in enumerate(m2)))


if __name__ == "__main__":
    main()
