"""What each lever of the default pipeline buys: the default run again with one lever turned back to what it was
before SPEC §3, §4, §6 and §7 were rewritten, each into its own copy of the default run's stages, so that only the
stages the lever changes are recomputed (the grid, the group bound and the validation lengths reuse the default's
samples and profiles; the frames and the synthetic share calibrate anew).

  grid        the evenly spaced alpha grid of the paper (SPEC §3 before; Config.grid = "paper")
  frames      calibration in the chat frame only (SPEC §4 before)
  synthetic   no synthetic retrieval samples (SPEC §4 before)
  bound       no group bound: the total loss alone (SPEC §6 before; rho = None)
  validation  plans judged at the validation length only (SPEC §7 before: the dense table stands in at the others)

Writes OUT/plan_<lever>.json; evaluate them beside the default's plan.json with bench/quality.py (several --plan files
into one --out share dense and the uniform baseline). Run from the repository root, on a GPU for the default's
sizes:  python examples/smollm2-135m-instruct/diagnostics/levers.py --model M --run DEFAULT_OUT --out OUT [LEVERS]"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, ".")
import moa  # noqa: E402

LEVERS = {"grid": dict(grid="paper"), "frames": dict(frames=("chat",)), "synthetic": dict(synthetic=0.0),
          "bound": dict(rho=None), "validation": {}}


def at_the_validation_length_only(validate):
    """validate, but with dense's own table at every length but cfg.validate_length (so no other length ranks)."""
    def one(model, cfg, valid, plain, plan_at, name, stages, key):
        return validate(model, cfg, valid, plain, lambda n: plan_at(n) if n == cfg.validate_length else None, name,
                        stages, key)
    return one


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="levers.py")
    moa.model_flags(p)
    p.add_argument("--run", required=True, help="the default run's --out folder (its stages are copied, not changed)")
    p.add_argument("--out", required=True)
    p.add_argument("levers", nargs="*", default=list(LEVERS), help=f"any of {', '.join(LEVERS)} (default: all)")
    a = p.parse_args()
    with moa.cli_errors():
        if unknown := set(a.levers) - set(LEVERS):
            raise moa.MoAError(f"unknown levers {sorted(unknown)}: give any of {', '.join(LEVERS)}")
        default = moa.load_plan(Path(a.run) / "plan.json")   # the settings the run had, as its plan records them
        if "calibration" not in default:
            raise moa.MoAError(f"{a.run}/plan.json records no calibration settings (an older pipeline's plan): give "
                               "the --out folder of a run of today's python moa.py")
        settings = {k: default[k] for k in ("lengths", "validate_length", "seed", "samples")}
        settings.update({k: default["calibration"][k] for k in ("instructions", "frames", "synthetic", "candidates",
                                                                 "local_window")}, density=default["density_budget"])
        model, tokenizer = moa.load_model(a.model, a.device, a.dtype, a.device_map)
        validate = moa.validate
        for lever in a.levers:
            stages = Path(a.out) / lever
            if not stages.exists():                  # copied whole or not at all: a kill mid-copy leaves no folder
                tmp = stages.with_name(stages.name + ".copying")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(a.run, tmp, ignore=shutil.ignore_patterns("plan*.json"))
                tmp.rename(stages)
            moa.validate = at_the_validation_length_only(validate) if lever == "validation" else validate
            try:
                plan = moa.compress(model, tokenizer, out=stages, **settings, **LEVERS[lever])
            except moa.MoAError as e:                          # e.g. no plan within a bound: say so, go on
                print(f"{lever}: {e}")
                continue
            moa.save_plan(plan, Path(a.out) / f"plan_{lever}.json")
