"""Where the time of `python moa.py` goes: moa.py's main with each part timed, CUDA-synchronised around every call (a GPU
only). Parts nest: generate and the answer_losses "local" and (of the selection) "dense" run inside make_samples,
the influence histograms (kernel.influence, or kernel.influence_reference where the fused path is off) inside profile;
the indented ones are the inner parts.
An interrupt (Ctrl-C, or `timeout -s INT`) still prints the table of what ran.
Run from the repository root:  python examples/smollm2-135m-instruct/diagnostics/pipeline_parts.py MOA_ARGS..."""
import collections, sys, time
sys.path.insert(0, ".")
import torch, transformers
import kernel, moa

T, C = collections.defaultdict(float), collections.Counter()


def timed(owner, name, key):
    f = getattr(owner, name)

    def g(*a, **k):
        torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            torch.cuda.synchronize()
            kk = key(a, k)
            T[kk] += time.perf_counter() - t
            C[kk] += 1
    setattr(owner, name, g)


timed(moa, "make_samples", lambda a, k: f"make_samples @{a[4]}")
timed(transformers.GenerationMixin, "generate", lambda a, k: f"  generate @{a[1].shape[1] + 128}")
timed(moa, "answer_losses", lambda a, k: "answer_losses " + (a[3] if len(a) > 3 else k.get("desc", "loss")).split()[0])
timed(moa, "profile", lambda a, k: f"profile @{a[1]['input_ids'].shape[1]} " + ("at plan" if (a[3] if len(a) > 3 else k.get("plan")) is not None else "dense"))
timed(kernel, "influence", lambda a, k: f"  influence @{a[0].shape[2]}")
timed(kernel, "influence_reference", lambda a, k: f"  influence_reference @{a[0].shape[2]}")
timed(moa, "pareto_front", lambda a, k: "pareto_front")
timed(moa, "near_plans", lambda a, k: "near_plans")
t0 = time.perf_counter()
try:
    moa.main(sys.argv[1:])
finally:
    print(f"\n{'part':<40} {'calls':>6} {'seconds':>9}")
    for kk in sorted(T):
        print(f"{kk:<40} {C[kk]:>6} {T[kk]:>9.1f}")
    print(f"{'main':<40} {1:>6} {time.perf_counter() - t0:>9.1f}")
