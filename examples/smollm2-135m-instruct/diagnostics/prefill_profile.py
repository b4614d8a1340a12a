"""Where the plan's time to the first token goes, SmolLM2 4k, against dense eager.
One prefill-only generate (max_new_tokens=1) profiled with CPU + CUDA activity after two warm-ups."""
import sys, time, torch
sys.path.insert(0, ".")   # run from the repository root: python examples/.../prefill_profile.py M PLAN
from torch.profiler import ProfilerActivity, profile
from bench.decode import prefill_chunk
from moa import load_model, load_plan, following
model, _ = load_model(sys.argv[1], device="cuda")
plan = load_plan(sys.argv[2])
for batch, n in ((1, 4096), (8, 4096)):
    ids = torch.randint(100, 40000, (batch, n), device="cuda")
    for name, p in (("dense-eager", None), ("plan", plan)):
        def go():
            with following(model, p):
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                               pad_token_id=0, prefill_chunk_size=prefill_chunk(batch),
                               disable_compile=True)
        for _ in range(2):
            go()
        torch.cuda.synchronize(); t = time.perf_counter(); go(); torch.cuda.synchronize()
        wall = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            go(); torch.cuda.synchronize()
        ev = prof.key_averages()
        # counts a kernel twice where its op reports it too: the GPU's busy time is the table's "Self CUDA time total"
        gpu = sum(e.self_device_time_total for e in ev) / 1e3
        syncs = sum(e.count for e in ev if "Synchronize" in e.key or "cudaMemcpy" in e.key)
        print(f"\n=== B={batch} N={n} {name}: wall {wall*1e3:.1f} ms, GPU busy {gpu:.1f} ms, syncs+memcpy calls {syncs}")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        print(ev.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60))
