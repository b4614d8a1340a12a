"""
Quality of a MoA plan against dense attention and the uniform baseline at the same density (SPEC §11), on held-out
text at several lengths: copy and pass-key retrieval at five depths, answer loss, perplexity. Writes results.csv and
PNGs; measurements are saved and resumed.
Run:  python bench/quality.py [--model M] --plan PLAN.json [PLAN2.json ...] --out DIR
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # moa.py and kernel.py live one folder up

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moa import (Config, MoAError, Stages, cli_errors, fingerprint, following, kv_rules, length_limit, load_documents,
                 load_model, load_plan, make_samples, model_fingerprint, model_flags, plan_density, row_batches,
                 sample_room, split_documents, tokenize_documents, uniform_plan, window, answer_losses, chat_frame,
                 check_length)

EVAL_LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)   # where the retrieved segment or pass key sits, as a fraction of the context
SEGMENT, CUE = 64, 8                 # copy retrieval: a random 64-token segment; its first 8 tokens are the cue


def filler(tokenizer, docs, n, rng):
    """n tokens of held-out text: the documents in a random order, concatenated. Returns a list of ids."""
    ids = []
    for i in rng.permutation(len(docs)):
        ids += tokenizer(docs[i] + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise MoAError(f"the held-out documents hold {len(ids)} tokens, fewer than the {n} an evaluation needs")


def copy_inputs(tokenizer, docs, n, depth, count, rng):
    """Copy retrieval: text with a random segment at `depth`, then the segment again at the end, [count, n].
    The model reads the repeat teacher-forced; its last SEGMENT - CUE tokens are scored."""
    rows = []
    for _ in range(count):
        text = filler(tokenizer, docs, n - 2 * SEGMENT, rng)
        vocab = np.unique(text)
        segment = rng.choice(vocab, SEGMENT).tolist()          # tokens of real text, in a random order
        at = int(depth * len(text))
        rows.append(text[:at] + segment + text[at:] + segment)
    return torch.tensor(rows)


def copy_accuracy(model, ids, plan):
    """Teacher-forced top-1 accuracy on the repeated segment after its cue, per row [B]."""
    out, batches = [], row_batches(ids)
    with following(model, plan):
        for b in batches:
            row = ids[b:b + batches.step].to(model.device)
            logits = model(row, logits_to_keep=SEGMENT - CUE + 1).logits[:, :-1]
            out.append((logits.argmax(-1) == row[:, -(SEGMENT - CUE):].to(logits.device)).float().mean(1).cpu())
    return torch.cat(out)


# Pass-key prompts in three formats that differ in filler, template and wording, each with a 5-digit key hidden at a
# depth: (chat template, filler: None for the held-out documents or a sentence repeated, the key's sentence, question)
INTRO = "A number is hidden somewhere in the long text below. Read carefully and keep it in mind: you will be asked " \
        "for it at the end.\n"
SENTENCE = " The river runs past the old mill. Birds sing in the morning. The road turns left at the hill."
PASSKEY = {"passkey": (True, None, "\nThe pass key is {key}. Remember it: {key} is the pass key.\n",
                       "What is the pass key? Answer with the number only."),
           "passkey_chat": (True, SENTENCE, " The secret number is {key}. Keep {key} in mind.", "What is the number?"),
           "passkey_plain": (False, SENTENCE, " The pass key is {key}. Do not forget {key}.",
                             "\n\nQuestion: what is the pass key? Answer: the pass key is")}


def passkey_inputs(tokenizer, docs, n, depth, count, rng, new_tokens, form="passkey"):
    """Pass-key retrieval in the format PASSKEY[form]: a prompt of n - new_tokens tokens with a 5-digit key hidden at
    `depth` of its filler. Returns ids [count, n - new_tokens] and the keys."""
    chat, sentence, needle, question = PASSKEY[form]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    before, after = chat_frame(tokenizer, question) if chat else ([], encode(question))
    before += encode(INTRO) if sentence else []
    rows, keys = [], []
    for _ in range(count):
        key = str(rng.integers(10000, 100000))
        secret = encode(needle.format(key=key))
        room = n - new_tokens - len(before) - len(after) - len(secret)
        text = filler(tokenizer, docs, room, rng) if sentence is None else (encode(sentence) * room)[:room]
        at = int(depth * len(text))
        rows.append(before + text[:at] + secret + text[at:] + after)
        keys.append(key)
    return torch.tensor(rows), keys


def passkey_accuracy(model, tokenizer, ids, keys, plan, new_tokens):
    """1 where greedy generation (through the plan's cache and decode kernel) states the key, else 0, per row.
    Eager: a compile per batch shape would cost more than 16 tokens take (compiled equals eager: the GPU tests)."""
    out, batches = [], row_batches(ids)
    with following(model, plan):
        for b in batches:
            rows = ids[b:b + batches.step].to(model.device)
            gen = model.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id, disable_compile=True)
            text = tokenizer.batch_decode(gen[:, rows.shape[1]:], skip_special_tokens=True)
            out += [float(k in t) for k, t in zip(keys[b:b + batches.step], text)]
    return torch.tensor(out)


def token_losses(model, ids, plan):
    """Mean next-token cross-entropy over each whole row [B] (for perplexity)."""
    out = []
    with following(model, plan):
        for row in ids.split(1):                                          # full-vocabulary logits: one row at a time
            row = row.to(model.device)
            logits = model(row).logits[:, :-1].float()
            out.append(F.cross_entropy(logits.transpose(1, 2), row[:, 1:].to(logits.device)).reshape(1).cpu())
    return torch.cat(out)


def evaluate(model, tokenizer, plan, out, lengths=EVAL_LENGTHS, samples=20, seed=0, new_tokens=16, stages=None):
    """Dense, the uniform baseline at the plan's density (SPEC §11) and the plan, on the same held-out inputs at each
    length: copy and pass-key retrieval at each depth (`samples` each), answer loss on SPEC §4 samples and
    perplexity on plain text (`samples` each). Writes out/results.csv and PNGs. Measurements are saved (`stages`, a
    Stages; default: under `out`) by the windows measured, so a rerun resumes and an evaluation of another plan
    into the same stages measures dense once. Returns the rows (measure, method, length, depth, mean, sem, count)."""
    kv_rules(plan, model.config)                             # clear errors before any output
    if samples < 1 or seed < 0:
        raise MoAError(f"--samples {samples} and --seed {seed}: give at least 1 sample and a seed of 0 or more")
    check_length(max(lengths), length_limit(plan, model.config), fix="give shorter --lengths")
    cfg = Config(seed=seed, samples=samples).resolved(model.device, model.config)
    docs = split_documents(load_documents(), seed)[2]   # evaluation documents: no run calibrates or validates on them
    held_out = tokenize_documents(tokenizer, docs)
    sample_room(tokenizer, held_out, max(lengths), cfg, "held-out")
    stages = stages or Stages(out)
    base = fingerprint(model_fingerprint(model), samples, seed, new_tokens)
    rows = []
    with torch.no_grad():
        for n in tqdm(lengths, desc="lengths"):
            rng = np.random.default_rng([seed, n])
            copies = {z: copy_inputs(tokenizer, docs, n, z, samples, rng) for z in DEPTHS}
            passkeys = {(f, z): passkey_inputs(tokenizer, docs, n, z, samples, rng, new_tokens, f)
                        for f in PASSKEY for z in DEPTHS}
            text = torch.tensor([filler(tokenizer, docs, n, rng) for _ in range(samples)])
            answers = stages(f"answers_{n}", fingerprint(base, n), lambda: make_samples(
                model, tokenizer, held_out, samples, n, cfg, seed=[seed, n, 2]))
            uniform = uniform_plan(model.config, plan_density(plan, model.config, n), n, plan["sink"])
            for name, p in {"dense": None, "uniform": uniform, "plan": plan}.items():
                w = None if p is None else window(*kv_rules(p, model.config), n).tolist()
                measure = lambda what, fn, depth="": rows.append((what, name, n, depth, stages(
                    f"{what}_{fingerprint(w)}_{n}_{depth}", fingerprint(base, n, w, what, depth), fn)))
                for z in DEPTHS:
                    measure("copy", lambda: copy_accuracy(model, copies[z], p), z)
                for f, z in passkeys:
                    measure(f, lambda: passkey_accuracy(model, tokenizer, *passkeys[f, z], p, new_tokens), z)
                measure("answer_loss", lambda: answer_losses(model, answers, p))
                measure("text_loss", lambda: token_losses(model, text, p))
    sem = lambda v: float(v.std() / len(v) ** 0.5) if len(v) > 1 else math.nan       # one sample: no spread
    rows = [(what, name, n, z, float(v.mean()), sem(v), len(v)) for what, name, n, z, v in rows]
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "results.csv", "w") as f:
        f.write("measure,method,length,depth,mean,sem,count\n")
        f.writelines(",".join(map(str, r)) + "\n" for r in rows)
    eval_summary(rows, lengths)
    plot(rows, plan, model.config, Path(out))
    return rows


def eval_summary(rows, lengths):
    """Per length and method: copy and pass-key accuracy (each format) over all depths, answer loss, perplexity."""
    table = {}
    for what, name, n, z, mean, sem, count in rows:
        table.setdefault((n, name), {}).setdefault(what, []).append((mean, sem))
    accuracies = ("copy", *PASSKEY)
    print(f"\n{'length':>6} {'method':>8}" + "".join(f"{a:>14}" for a in accuracies) + f"{'answer loss':>17} "
          f"{'text ppl':>9}")
    for n in lengths:
        for name in ("dense", "uniform", "plan"):
            t = {k: (np.mean([m for m, _ in v]), np.sqrt(np.mean([s ** 2 for _, s in v]) / len(v)))
                 for k, v in table[(n, name)].items()}
            print(f"{n:>6} {name:>8}" + "".join(f"{t[a][0]:>8.3f}±{t[a][1]:.3f}" for a in accuracies) +
                  f" {t['answer_loss'][0]:>10.4f}±{t['answer_loss'][1]:.4f} {math.exp(t['text_loss'][0]):>9.2f}")
    print("(mean ± standard error over the samples; accuracies averaged over depths "
          f"{', '.join(map(str, DEPTHS))})")


def plot(rows, plan, config, out):
    """accuracy_vs_length.png, accuracy_vs_depth.png (at the longest length) and windows.png (the plan's window per
    layer and KV head at 2k and 8k, as a fraction of N)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib, then rerun the same command for the PNGs "
              "(the measurements resume from disk)")
        return
    lengths = sorted({r[2] for r in rows})
    pick = lambda what, name, n=None, z=None: [r for r in rows if r[0] == what and r[1] == name
                                               and (n is None or r[2] == n) and (z is None or r[3] == z)]
    for by, xs, fname in (("length", lengths, "accuracy_vs_length.png"), ("depth", DEPTHS, "accuracy_vs_depth.png")):
        fig, axes = plt.subplots(1, 1 + len(PASSKEY), figsize=(5 * (1 + len(PASSKEY)), 4))
        for ax, what in zip(axes, ("copy", *PASSKEY)):
            for name in ("dense", "uniform", "plan"):
                vals = [[r[4] for r in (pick(what, name, n=x) if by == "length" else pick(what, name, lengths[-1], x))]
                        for x in xs]
                ax.plot(xs, [np.mean(v) for v in vals], marker="o", label=name)
            ax.set(title=f"{what} retrieval" + (f" at {lengths[-1]} tokens" if by == "depth" else ""),
                   xlabel=by, ylabel="accuracy", ylim=(0, 1.02))
            if by == "length":
                ax.set_xscale("log", base=2)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8, 6))
    for ax, n in zip(axes, (2048, 8192)):
        im = ax.imshow(window(*kv_rules(plan, config), n) / n, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(title=f"window / N at N = {n}", xlabel="KV head")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes)
    fig.savefig(out / "windows.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out}/accuracy_vs_length.png, accuracy_vs_depth.png, windows.png")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/quality.py", description="dense vs uniform vs a plan: retrieval and loss")
    model_flags(p)
    p.add_argument("--plan", required=True, nargs="+",
                   help="plan files; with several, OUT/<plan file name>/ holds each one's results")
    p.add_argument("--out", required=True, help="folder for results.csv, the PNGs and the resumable measurements")
    p.add_argument("--lengths", type=int, nargs="+", default=list(EVAL_LENGTHS))
    p.add_argument("--samples", type=int, default=20, help="per depth (retrieval) and per length (losses)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    with cli_errors():
        plans = {Path(f).stem: load_plan(f) for f in a.plan}
        if len(plans) < len(a.plan):
            raise MoAError("two plan files have the same name: copy them to distinct names first")
        model, tokenizer = load_model(a.model, a.device, a.dtype, a.device_map)
        stages = Stages(a.out)
        for name, plan in plans.items():
            evaluate(model, tokenizer, plan, Path(a.out) / name if len(plans) > 1 else a.out, tuple(a.lengths),
                     a.samples, a.seed, stages=stages)


if __name__ == "__main__":
    main()
