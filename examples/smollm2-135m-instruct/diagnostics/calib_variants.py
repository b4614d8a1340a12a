"""Which calibration instruction/corpus gives answers that depend on distant context? (issue 4 diagnostic, GPU)"""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
import numpy as np, torch, moa
model, tok = moa.load_model(os.environ.get("GGUF"), "cuda", "float32")
cal_docs, held = moa.split_documents(moa.load_documents(), 0)
VARIANTS = {"summ": "Summarize the document above in a few sentences.",
            "parts": "Describe each part of the document above in order, one line per part.",
            "toc": "List the titles of all the sections in the document above.",
            "qa": "Write three questions about the document above, each followed by its answer."}
H, G = moa.kv_heads(model.config)
rank = lambda x: np.argsort(np.argsort(-x))
def far(samples, n):
    h = moa.profile(model, samples).double()
    h = h.reshape(len(h), G, H // G, n).sum(2).reshape(-1, n)
    return (h[:, 256:].sum(1) / h.sum()).cpu().numpy(), (h[:, n // 4:].sum() / h.sum()).item()
for n in (1024, 2048, 4096):
    rng = np.random.default_rng(1)
    ids = torch.cat([moa.copy_inputs(tok, held, n, depth, 1, rng) for depth in (0.1, 0.3, 0.5, 0.7, 0.9)])
    copy = {"input_ids": ids, "answer_start": torch.full((5,), n - (moa.SEGMENT - moa.CUE))}
    fc, qc = far(copy, n)
    top = np.argsort(-fc)[:8]
    print(f"\n### n={n} copy: far>=256 share {fc.sum():.3f}, >=N/4 share {qc:.3f}; top copy heads {[(int(k//G), int(k%G)) for k in top]}")
    for name, instr in VARIANTS.items():
        t = time.time()
        s = moa.make_samples(model, tok, moa.tokenize_documents(tok, cal_docs), 8, n, moa.Config(samples=8, instruction=instr), seed=[0, n, False])
        f, q = far(s, n)
        lens = (n - s["answer_start"]).tolist()
        print(f"{name:6s} far>=256 {f.sum():.3f} >=N/4 {q:.3f} rankcorr {np.corrcoef(rank(f), rank(fc))[0,1]:.2f} "
              f"copy-head ranks {[int(rank(f)[k] + 1) for k in top]} answer lens {lens} {time.time()-t:.0f}s")
        if n == 2048:
            for r, a in list(zip(s["input_ids"], s["answer_start"]))[:2]:
                print("   ANSWER:", repr(tok.decode(r[int(a):])[:400]))
