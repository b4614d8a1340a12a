"""
Quality of a MoA plan against dense attention and the uniform baseline at the same density budget (SPEC §11), on
held-out text at several lengths: copy retrieval (three kinds of segment, in two frames) and a suite of pass-key
formats at five depths, answer loss, perplexity. Writes results.csv and PNGs; measurements are saved and resumed.
Run:    python bench/quality.py [--model M] --plan PLAN.json [PLAN2.json ...] --out DIR
Table:  python bench/quality.py --table DIR/*/results.csv      (README's quality table, markdown)
"""
import argparse
import csv
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # moa.py and kernel.py live one folder up

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kernel import check_length
from moa import (Config, MoAError, Stages, cli_errors, fingerprint, following, kv_rules, length_limit, load_documents,
                 load_model, load_plan, make_samples, model_fingerprint, model_flags, plan_density, row_batches,
                 sample_room, split_documents, tokenize_documents, uniform_plan, window, answer_losses, chat_frame,
                 encode)

EVAL_LENGTHS = (1024, 2048, 4096, 8192)
PASSKEY_LENGTHS = (1024, 2048)       # the format suite's lengths (the pass-key targets' lengths; see --passkey-lengths)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)   # where the retrieved segment or pass key sits, as a fraction of the context
SEGMENT, CUE = 64, 8                 # copy retrieval: a 64-token segment; its first 8 tokens are the cue
FRAMES = ("chat", "plain")           # a user turn in the tokenizer's chat template, or plain text the model continues

# ----------------------------------------------------------------------------------------------------------------
# The evaluation's wordings. Calibration never uses them (SPEC §4: a test checks moa.SYNTHETIC against every string
# here). "{key}" is the pass key, "{cue}" the first words of the segment to copy. Chat questions are the user's
# request after the text; plain ones are text that the model continues with the key.
FORMATS = {
    "intro": (
        "A number is hidden somewhere in the long text below. Read carefully and keep it in mind: you will be asked "
        "for it at the end.\n",
        "What follows is a set of reference pages. Somewhere among them is a detail you will be asked about "
        "afterwards.\n",
        "Please read the material below attentively; a question about one small detail comes after it.\n",
        "The following notes were copied out of an old notebook.\n"),
    "planted": (
        "\nThe pass key is {key}. Remember it: {key} is the pass key.\n",
        " The secret number is {key}. Keep {key} in mind.",
        " The pass key is {key}. Do not forget {key}.",
        "\nNote: the combination for the blue locker is {key}.\n",
        " (For the record, the invoice number is {key}.)",
        "\nIMPORTANT - the door code for the back entrance is {key}.\n",
        " By the way, Margaret's lucky number is {key}.",
        "\nCatalogue number of this volume: {key}.\n",
        " The parcel was sent with tracking number {key}.",
        " The winning lottery ticket carried the number {key}.",
        " The vault on the third floor opens with the code {key}."),
    "question": (
        "What is the pass key? Answer with the number only.",
        "What is the number?",
        "What is the combination of the blue locker? Give just the number.",
        "What is the door code?",
        "What is the catalogue number of this volume?",
        "Which code opens the vault?",
        "\n\nQuestion: what is the pass key? Answer: the pass key is",
        "\n\nQ: What is the combination for the blue locker?\nA: The combination is",
        "\n\nAs noted in passing above, the invoice number is",
        "\n\nIn short, Margaret's lucky number is",
        "\n\nThe parcel's tracking number, as given above, was",
        "\n\nQuestion: Which number did the winning lottery ticket carry?\nAnswer: It carried the number"),
    "filler": (          # a sentence repeated to fill the context (the other filler: the held-out documents)
        " The river runs past the old mill. Birds sing in the morning. The road turns left at the hill.",
        " Rain fell on the quiet town all afternoon, and the shops closed early.",
        " The committee read the minutes of the last meeting and approved them without changes."),
    "copy": ("Starting from \"{cue}\", repeat the text above exactly as it is written.",),
}
# The pass-key formats: fixed combinations (frame, intro, planted sentence, question, filler), each an index into
# FORMATS' lists; no intro, and the held-out documents as filler, are None. Half chat, half plain; half documents.
PASSKEY = {
    "passkey":         ("chat", None, 0, 0, None),     # the classic prompt
    "passkey_chat":    ("chat", 0, 1, 1, 0),
    "passkey_plain":   ("plain", 0, 2, 6, 0),
    "locker_chat":     ("chat", 1, 3, 2, None),
    "locker_plain":    ("plain", 3, 3, 7, None),
    "invoice_plain":   ("plain", None, 4, 8, None),
    "door_chat":       ("chat", None, 5, 3, 2),
    "lucky_plain":     ("plain", 1, 6, 9, 1),
    "catalogue_chat":  ("chat", 3, 7, 4, None),
    "parcel_plain":    ("plain", 2, 8, 10, None),
    "vault_chat":      ("chat", 2, 10, 5, 1),
    "lottery_plain":   ("plain", None, 9, 11, 2),
}
COPY_KINDS = ("tokens", "words", "passage")   # the segment: drawn tokens, drawn real words, a held-out passage


# ----------------------------------------------------------------------------------------------------------------
# Inputs, all from the held-out documents (token ids, each followed by a blank line's)


def filler(doc_ids, n, rng, skip=()):
    """n tokens of held-out text: the documents (but those in `skip`) in a random order, concatenated."""
    ids = []
    for i in rng.permutation(len(doc_ids)):
        ids += doc_ids[i] if i not in skip else []
        if len(ids) >= n:
            return ids[:n]
    raise MoAError(f"the held-out documents hold {len(ids)} tokens, fewer than the {n} an evaluation needs")


def words_of(docs):
    """The held-out text's vocabulary of words: its distinct runs of letters, sorted."""
    return sorted(set(re.findall(r"[A-Za-z]+", "\n".join(docs))))


def passage(tokenizer, docs, rng):
    """A real held-out passage: SEGMENT contiguous tokens of a random held-out document, whose text occurs nowhere
    in the held-out documents but in that document's copies. Returns its ids and those copies' indices."""
    corpus = "\0".join(docs)
    for _ in range(1000):
        i = int(rng.integers(len(docs)))
        ids = encode(tokenizer, docs[i])
        if len(ids) < SEGMENT:
            continue
        start = int(rng.integers(len(ids) - SEGMENT + 1))
        span, copies = ids[start:start + SEGMENT], [j for j, d in enumerate(docs) if d == docs[i]]
        text = tokenizer.decode(span)
        if corpus.count(text) <= len(copies) * docs[i].count(text):
            return span, copies
    raise MoAError(f"no held-out document has {SEGMENT} tokens of its own: give longer documents")


def framed(tokenizer, frame, request):
    """Token ids (before, after) around a text in `frame`: the chat turn whose request follows the text, or plain
    text, begun as the tokenizer begins any text (its BOS, if it adds one) and followed by `request` to continue."""
    if frame == "chat":
        return chat_frame(tokenizer, request)
    return tokenizer("")["input_ids"], encode(tokenizer, request)


def copy_inputs(tokenizer, docs, doc_ids, words, n, kind, frame, depth, count, rng):
    """Copy retrieval: held-out text with a segment of `kind` (COPY_KINDS) at `depth`, then the segment again at the
    end, in `frame`: plain, or the chat turn asks for the text from the segment's cue on and the reply repeats it.
    [count, n]. The model reads the repeat teacher-forced; its last SEGMENT - CUE tokens are scored."""
    rows = []
    for _ in range(count):
        segment, skip = passage(tokenizer, docs, rng) if kind == "passage" else (None, ())
        text = filler(doc_ids, n - 2 * SEGMENT, rng, skip)
        if kind == "tokens":
            segment = rng.choice(np.unique(text), SEGMENT).tolist()       # tokens of the text, in a random order
        elif kind == "words":
            segment = encode(tokenizer, " " + " ".join(rng.choice(words, SEGMENT)))[:SEGMENT]
        cue = " ".join(tokenizer.decode(segment[:CUE]).split())
        before, after = framed(tokenizer, frame, FORMATS["copy"][0].format(cue=cue) if frame == "chat" else "")
        text = text[:len(text) - len(before) - len(after)]
        at = int(depth * len(text))
        rows.append(before + text[:at] + segment + text[at:] + after + segment)
    return torch.tensor(rows)


def passkey_inputs(tokenizer, doc_ids, n, form, depth, count, rng, new_tokens):
    """Pass-key retrieval in the format PASSKEY[form]: a prompt of n - new_tokens tokens with a 5-digit key planted at
    `depth` of its filler. Returns ids [count, n - new_tokens] and the keys (str)."""
    frame, intro, planted, question, sentence = PASSKEY[form]
    question = FORMATS["question"][question]
    before, after = framed(tokenizer, frame, question)
    before = before + (encode(tokenizer, FORMATS["intro"][intro]) if intro is not None else [])
    rows, keys = [], []
    for _ in range(count):
        key = str(rng.integers(10000, 100000))
        secret = encode(tokenizer, FORMATS["planted"][planted].format(key=key))
        room = n - new_tokens - len(before) - len(after) - len(secret)
        text = (filler(doc_ids, room, rng) if sentence is None else
                (encode(tokenizer, FORMATS["filler"][sentence]) * room)[:room])
        at = int(depth * len(text))
        rows.append(before + text[:at] + secret + text[at:] + after)
        keys.append(key)
    return torch.tensor(rows), keys


def inputs(tokenizer, docs, doc_ids, words, n, samples, seed, new_tokens, passkey=True):
    """Every input at length n, `samples` of each, drawn with the seed [seed, n]: {"copy": {(kind_frame, depth): ids
    [samples, n]}, "passkey" (if `passkey`): {(format, depth): (ids [samples, n - new_tokens], keys)}, "text": plain
    held-out text [samples, n]}. Each task draws from its own generator: with or without pass-key, the others are
    the same."""
    copy, key, text = np.random.default_rng([seed, n]).spawn(3)
    tasks = {"copy": {(f"{kind}_{frame}", z): copy_inputs(tokenizer, docs, doc_ids, words, n, kind, frame, z, samples,
                                                          copy)
                      for kind in COPY_KINDS for frame in FRAMES for z in DEPTHS},
             "text": torch.tensor([filler(doc_ids, n, text) for _ in range(samples)])}
    if passkey:
        tasks["passkey"] = {(f, z): passkey_inputs(tokenizer, doc_ids, n, f, z, samples, key, new_tokens)
                            for f in PASSKEY for z in DEPTHS}
    return tasks


def held_out(plan, calib, other_documents=False):
    """The evaluation documents (SPEC §7) of the corpus `calib` (None: the bundled one), after checking that the plan
    was made on that very corpus (else its calibration may have read them); other_documents: evaluate anyway."""
    docs = load_documents(calib)
    made_on = (plan.get("calibration") or {}).get("documents")
    if made_on and made_on != fingerprint(docs) and not other_documents:
        here = "the bundled pydoc topics of this Python" if calib is None else calib
        raise MoAError(f"the plan was made on other documents (fingerprint {made_on}) than these ({fingerprint(docs)}, "
                       f"{here}), so the evaluation's may not be held out: give the plan's --calib file or run the "
                       "Python that made it, or pass --other-documents to evaluate anyway")
    return split_documents(docs, 0)[2]            # the evaluation quarter: the same for every seed


# ----------------------------------------------------------------------------------------------------------------
# Measures, each over a batch of rows of any formats


def copy_accuracy(model, ids, plan):
    """Teacher-forced top-1 accuracy on the repeated segment after its cue, per row [B]."""
    out, batches = [], row_batches(ids)
    with following(model, plan):
        for b in batches:
            row = ids[b:b + batches.step].to(model.device)
            logits = model(row, logits_to_keep=SEGMENT - CUE + 1).logits[:, :-1]
            out.append((logits.argmax(-1) == row[:, -(SEGMENT - CUE):].to(logits.device)).float().mean(1).cpu())
    return torch.cat(out)


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


def evaluate(model, tokenizer, plan, out, lengths=EVAL_LENGTHS, samples=20, seed=0, new_tokens=16, stages=None,
             passkey_lengths=PASSKEY_LENGTHS, calib=None, other_documents=False):
    """Dense, the uniform baseline at the plan's density budget (SPEC §11) and the plan, on the same held-out inputs
    at each length: copy (each kind of segment, each frame) at each depth, the pass-key formats at each depth at the
    passkey_lengths among `lengths` (`samples` each), answer loss on SPEC §4 samples and perplexity on plain text
    (`samples` each). Every format of a task is one batch of rows. Writes out/results.csv and PNGs. The inputs and
    measurements are saved (`stages`, a Stages; default: under `out`), the latter by the windows measured, so a
    rerun resumes and an evaluation of other plans into the same stages measures dense (and a shared uniform
    baseline) once. Returns the rows (measure, format, method, density, length, depth, mean, sem, count)."""
    kv_rules(plan, model.config)                             # clear errors before any output
    if samples < 1 or seed < 0:
        raise MoAError(f"--samples {samples} and --seed {seed}: give at least 1 sample and a seed of 0 or more")
    check_length(max(lengths), length_limit(plan, model.config), fix="give shorter --lengths")
    cfg = Config(seed=seed, samples=samples).resolved(model.device, model.config)
    docs = held_out(plan, calib, other_documents)           # no run calibrates or validates on them
    doc_ids, words = tokenize_documents(tokenizer, docs), words_of(docs)
    sample_room(tokenizer, doc_ids, max(lengths), cfg, "held-out")
    stages = stages or Stages(out)
    base = fingerprint(model_fingerprint(model), samples, seed, new_tokens, FORMATS, PASSKEY, docs)
    rows = []
    with torch.no_grad():
        for n in tqdm(lengths, desc="lengths"):
            tasks = stages(f"inputs_{n}", fingerprint(base, n, n in passkey_lengths), lambda: inputs(
                tokenizer, docs, doc_ids, words, n, samples, seed, new_tokens, n in passkey_lengths))
            copies = torch.cat(list(tasks["copy"].values()))
            if "passkey" in tasks:
                passkeys = (torch.cat([x for x, _ in tasks["passkey"].values()]),
                            [k for _, keys in tasks["passkey"].values() for k in keys])
            answers = stages(f"answers_{n}", fingerprint(base, n), lambda: make_samples(
                model, tokenizer, doc_ids, samples, n, cfg, seed=[seed, n, 2]))
            density, budget = plan_density(plan, model.config, n), plan.get("density_budget")
            density = budget if budget and density <= budget else density   # plans of one budget share the baseline
            uniform = uniform_plan(model.config, density, n, plan["sink"])
            for name, p in {"dense": None, "uniform": uniform, "plan": plan}.items():
                w = None if p is None else window(*kv_rules(p, model.config), n).tolist()
                d = 1.0 if p is None else plan_density(p, model.config, n)
                measure = lambda what, fn: stages(f"{what}_{fingerprint(w)}_{n}", fingerprint(base, n, w, what), fn)
                each = {"copy": measure("copy", lambda: copy_accuracy(model, copies, p))}
                if "passkey" in tasks:
                    each["passkey"] = measure("passkey", lambda: passkey_accuracy(model, tokenizer, *passkeys, p,
                                                                                  new_tokens))
                for what, v in each.items():
                    rows += [(what, f, name, d, n, z, x) for (f, z), x in zip(tasks[what], v.split(samples))]
                rows.append(("answer_loss", "", name, d, n, "", measure("answer_loss", lambda: answer_losses(
                    model, answers, p))))
                rows.append(("text_loss", "", name, d, n, "", measure("text_loss", lambda: token_losses(
                    model, tasks["text"], p))))
    sem = lambda v: float(v.std() / len(v) ** 0.5) if len(v) > 1 else math.nan       # one sample: no spread
    rows = [(*r[:-1], float(r[-1].mean()), sem(r[-1]), len(r[-1])) for r in rows]
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    print(summary(rows))
    plot(rows, plan, model.config, Path(out))
    return rows


COLUMNS = ("measure", "format", "method", "density", "length", "depth", "mean", "sem", "count")


# ----------------------------------------------------------------------------------------------------------------
# Reports: the summary, README's table, the PNGs


def digest(rows):
    """{(method, length): {"density": d, "copy": {kind_frame: accuracy}, "passkey": {format: accuracy},
    "answer_loss": {"": loss}, "text_loss": {"": loss}}}, accuracies as means over the depths, from result rows (as
    evaluate returns them, or a CSV's rows of str)."""
    out = {}
    for what, form, name, density, n, _, mean, *_ in rows:
        e = out.setdefault((name, int(n)), {"density": float(density)})
        e.setdefault(what, {}).setdefault(form, []).append(float(mean))
    return {k: {what: v if what == "density" else {f: float(np.mean(x)) for f, x in v.items()}
                for what, v in e.items()} for k, e in out.items()}


def length_name(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def worst(scores, frame=None):
    """(the lowest accuracy, its format) among `scores` ({format: accuracy}), those in `frame` only if given."""
    return min((v, f) for f, v in scores.items() if frame is None or f.endswith("_" + frame))


def summary(rows):
    """Per length and method: copy in each frame (the worst kind), the pass-key suite's mean and worst format, answer
    loss, perplexity; then each copy kind and pass-key format, per length (dense / uniform / plan)."""
    table = digest(rows)
    lengths, methods = sorted({n for _, n in table}), ("dense", "uniform", "plan")
    lines = [f"\n{'length':>6} {'method':>8} {'density':>7} {'copy chat':>10} {'copy plain':>10} {'passkey mean':>12} "
             f"{'passkey worst (format)':>30} {'answer loss':>11} {'text ppl':>8}"]
    for n in lengths:
        for name in methods:
            e = table[name, n]
            pk = e.get("passkey")
            pk = (f"{np.mean(list(pk.values())):>12.3f} {'%.3f (%s)' % worst(pk):>30}" if pk else
                  f"{'-':>12} {'-':>30}")
            lines.append(f"{n:>6} {name:>8} {e['density']:>7.3f} {worst(e['copy'], 'chat')[0]:>10.3f} "
                         f"{worst(e['copy'], 'plain')[0]:>10.3f} {pk} {e['answer_loss']['']:>11.4f} "
                         f"{math.exp(e['text_loss']['']):>8.2f}")
    forms = [("copy", f) for f in table["dense", lengths[0]]["copy"]]
    forms += [("passkey", f) for f in PASSKEY if any("passkey" in e for e in table.values())]
    lines.append(f"\n{'task':>8} {'format':>15}" + "".join(f"{n:>21}" for n in lengths))
    for what, f in forms:
        cells = ["/".join(f"{table[m, n][what][f]:.2f}" for m in methods) if what in table["dense", n] else "-"
                 for n in lengths]
        lines.append(f"{what:>8} {f:>15}" + "".join(f"{c:>21}" for c in cells))
    lines.append(f"(accuracies: means over depths {', '.join(map(str, DEPTHS))}; per format: dense/uniform/plan; "
                 "copy per frame and the pass-key worst: the lowest kind or format)")
    return "\n".join(lines)


def table(paths):
    """README's quality table (markdown) from results CSVs of this script: dense, the uniform baselines, each plan
    (named by its CSV's folder) at each length; a cell holds copy in the chat / plain frame (each the worst kind of
    segment), the pass-key suite's mean (and its worst format), and perplexity on plain held-out text."""
    found, lengths = {}, set()
    for path in paths:
        if not Path(path).is_file():
            raise MoAError(f"{path} does not exist: give results.csv files written by bench/quality.py")
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or tuple(rows[0]) != COLUMNS:
            raise MoAError(f"{path} is not a results.csv of this version of bench/quality.py: rerun the evaluation")
        results = digest(rows[1:])
        for (name, n), e in results.items():
            density = np.mean([x["density"] for (m, _), x in results.items() if m == name])
            label = {"dense": "dense", "uniform": f"uniform {density:.2f}"}.get(name, Path(path).parent.name)
            found.setdefault(label, {}).setdefault(n, e)                  # dense and shared baselines: the first
            lengths.add(n)
    lengths = sorted(lengths)
    cell = lambda e: (f"{worst(e['copy'], 'chat')[0]:.2f} / {worst(e['copy'], 'plain')[0]:.2f} · " +
                      (f"{np.mean(list(e['passkey'].values())):.2f} ({worst(e['passkey'])[0]:.2f})" if "passkey" in e
                       else "–") + f" · {math.exp(e['text_loss']['']):.2f}")
    lines = ["| method | " + " | ".join(map(length_name, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
    order = sorted(found, key=lambda k: (k != "dense", not k.startswith("uniform"), k))
    lines += [f"| {k} | " + " | ".join(cell(found[k][n]) if n in found[k] else "" for n in lengths) + " |"
              for k in order]
    lines.append(f"\nEach cell: copy accuracy in the chat / plain frame (the worst of {', '.join(COPY_KINDS)}) · "
                 f"pass-key accuracy, the mean over {len(PASSKEY)} formats (the worst format) · perplexity on plain "
                 "held-out text.")
    return "\n".join(lines)


def plot(rows, plan, config, out):
    """copy.png (each kind and frame against length), passkey.png (each format at each of its lengths),
    accuracy_vs_depth.png (copy and pass-key at the longest length of each) and windows.png (the plan's window per
    layer and KV head at 2k and 8k, as a fraction of N)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib, then rerun the same command for the PNGs "
              "(the measurements resume from disk)")
        return
    table, methods = digest(rows), ("dense", "uniform", "plan")
    lengths = sorted({n for _, n in table})
    fig, axes = plt.subplots(len(FRAMES), len(COPY_KINDS), figsize=(5 * len(COPY_KINDS), 4 * len(FRAMES)),
                             squeeze=False)
    for ax, (frame, kind) in zip(axes.flat, [(fr, k) for fr in FRAMES for k in COPY_KINDS]):
        for name in methods:
            ax.plot(lengths, [table[name, n]["copy"][f"{kind}_{frame}"] for n in lengths], marker="o", label=name)
        ax.set(title=f"copy, {kind}, {frame} frame", xlabel="length", ylabel="accuracy", ylim=(0, 1.02))
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_name(n) for n in lengths])
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "copy.png", dpi=120)
    plt.close(fig)
    suite = [n for n in lengths if "passkey" in table["dense", n]]
    if suite:
        fig, axes = plt.subplots(len(suite), 1, figsize=(12, 4 * len(suite)), squeeze=False)
        x = np.arange(len(PASSKEY))
        for ax, n in zip(axes.flat, suite):
            for i, name in enumerate(methods):
                ax.bar(x + (i - 1) * 0.27, [table[name, n]["passkey"][f] for f in PASSKEY], 0.27, label=name)
            ax.set(title=f"pass-key formats at {n} tokens", ylabel="accuracy", ylim=(0, 1.02))
            ax.set_xticks(x, list(PASSKEY), rotation=30, ha="right")
            ax.legend(ncols=3)
        fig.tight_layout()
        fig.savefig(out / "passkey.png", dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what, n in zip(axes, ("copy", "passkey"), (lengths[-1], suite[-1] if suite else None)):
        for name in methods:
            if n is not None:
                ax.plot(DEPTHS, [np.mean([r[6] for r in rows if (r[0], r[2], r[4], r[5]) == (what, name, n, z)])
                                 for z in DEPTHS], marker="o", label=name)
        ax.set(title=f"{what}, mean over formats" + (f", at {n} tokens" if n else ": not measured"),
               xlabel="depth", ylabel="accuracy", ylim=(0, 1.02))
        ax.legend() if n else None
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_depth.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8, 6))
    for ax, n in zip(axes, (2048, 8192)):
        im = ax.imshow(window(*kv_rules(plan, config), n) / n, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(title=f"window / N at N = {n}", xlabel="KV head")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes)
    fig.savefig(out / "windows.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out}/copy.png, {'passkey.png, ' if suite else ''}accuracy_vs_depth.png, windows.png")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/quality.py", description="dense vs uniform vs a plan: retrieval and loss")
    model_flags(p)
    p.add_argument("--plan", nargs="+", help="plan files; with several, OUT/<plan file name>/ holds each one's results")
    p.add_argument("--out", help="folder for results.csv, the PNGs and the resumable measurements")
    p.add_argument("--lengths", type=int, nargs="+", default=list(EVAL_LENGTHS))
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=list(PASSKEY_LENGTHS),
                   help="the lengths (among --lengths) that run the pass-key formats")
    p.add_argument("--samples", type=int, default=20, help="per depth (retrieval) and per length (losses)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", help="the corpus the plans were made on (default: Python's bundled pydoc topics)")
    p.add_argument("--other-documents", action="store_true",
                   help="evaluate a plan made on other documents than --calib's (they may not be held out)")
    p.add_argument("--table", nargs="+", metavar="CSV", help="print README's quality table from results.csv files")
    a = p.parse_args(argv)
    with cli_errors():
        if a.table:
            print(table(a.table))
            return
        if not a.plan or not a.out:
            raise MoAError("give --plan and --out to evaluate, or --table with results.csv files")
        plans = {Path(f).stem: load_plan(f) for f in a.plan}
        if len(plans) < len(a.plan):
            raise MoAError("two plan files have the same name: copy them to distinct names first")
        model, tokenizer = load_model(a.model, a.device, a.dtype, a.device_map)
        for plan in plans.values():                                        # every plan's errors before any output
            held_out(plan, a.calib, a.other_documents)
        stages = Stages(a.out)
        for name, plan in plans.items():
            evaluate(model, tokenizer, plan, Path(a.out) / name if len(plans) > 1 else a.out, tuple(a.lengths),
                     a.samples, a.seed, stages=stages, passkey_lengths=tuple(a.passkey_lengths), calib=a.calib,
                     other_documents=a.other_documents)


if __name__ == "__main__":
    main()
