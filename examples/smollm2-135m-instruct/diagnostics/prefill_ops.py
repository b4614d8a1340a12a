"""Host work of one prefill (generate, max_new_tokens=1) with a plan, SmolLM2 on the CPU: aten ops, and the reads
that wait for the device on a GPU as the profiler sees them on a CPU: item / bool (aten::_local_scalar_dense) and
nonzero. A .tolist() of a device tensor also waits on a GPU, but on a CPU the profiler records no op for it.
Run:  python examples/smollm2-135m-instruct/diagnostics/prefill_ops.py REPO PLAN   (REPO: the checkout to measure)"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import moa
from torch.profiler import profile, ProfilerActivity
model, tok = moa.load_model(None, device="cpu")
plan = moa.load_plan(sys.argv[2])
for batch, n, padded in ((1, 1024, False), (4, 1024, False), (4, 1024, True)):
    ids = torch.randint(100, 40000, (batch, n))
    mask = torch.ones_like(ids)
    if padded:
        mask[1:, :100] = 0
    for name, p in (("dense", None), ("plan", plan)):
        with moa.following(model, p):
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        ev = prof.key_averages()
        ops = sum(e.count for e in ev if e.key.startswith("aten::"))
        syncs = sum(e.count for e in ev if e.key in ("aten::_local_scalar_dense", "aten::nonzero"))
        print(f"B={batch} N={n} padded={padded} {name:>5}: aten ops {ops}, item/bool and nonzero calls {syncs}", flush=True)
