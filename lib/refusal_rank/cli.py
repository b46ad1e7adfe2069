"""``refusal-rank``: one command line for the series and what it leaves behind.

    refusal-rank run [--profile P] [--from NN] [--to NN] [--only NN] [--fresh]   the notebook series (run_all.sh)
    refusal-rank figures [--profile P]                                           redraw every figure from results/P/
    refusal-rank report [--profile P] [--write-readme] [--headline]              the README's generated blocks
    refusal-rank train-variant --variant NAME | --plan [--until 2x] [--profile P]  defense variants, resumable
    refusal-rank progress [--profile P] [--write]                                what the queue has trained and measured
    refusal-rank audit ...                                                       the audit (refusal_rank.audit)

``run`` hands over to ``run_all.sh`` (it installs what a profile needs, skips finished notebooks and names
a failing cell), so the series has one implementation. Everything else runs in this process.
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from typing import Sequence

from .config import REPO_ROOT


def _profile_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--profile", default=None, help="tiny, cpu (default, or $REFUSAL_RANK_PROFILE), cpu-small, paper")


def cmd_run(a: argparse.Namespace) -> int:
    script = REPO_ROOT / "run_all.sh"
    if not script.is_file():
        print(f"refusal-rank run needs the repository's run_all.sh, which is not at {script}: run it from a clone.",
              file=sys.stderr)
        return 2
    args = [str(script)]
    if a.profile:
        args += ["--profile", a.profile]
    for flag in ("from_", "to", "only"):
        value = getattr(a, flag)
        if value:
            args += [f"--{flag.rstrip('_')}", value]
    if a.fresh:
        args.append("--fresh")
    return subprocess.call(args, cwd=REPO_ROOT)


def cmd_figures(a: argparse.Namespace) -> int:
    import matplotlib

    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")  # files only: no window, whatever display there is
    from . import plotting
    from .config import resolve_profile_name

    profile = resolve_profile_name(a.profile)
    done = plotting.redraw(profile, out_dir=a.out, names=a.only or None)
    for name, paths in done.items():
        print(f"{name}: " + ", ".join(os.path.relpath(p, os.getcwd()) for p in paths))
    # committed figures without values are said whether the redraw goes to figures/<profile>/ or elsewhere
    missing = plotting.missing_data(profile) if not a.only else []
    if missing:
        print(f"not redrawn, committed in figures/{profile}/ without values in results/{profile}/figure_data/ "
              f"(rerun the notebook that draws it): "
              + ", ".join(missing), file=sys.stderr)
    if not done:
        print(f"no figure data in results/{profile}/figure_data/: run the series for profile {profile!r} first.",
              file=sys.stderr)
        return 1
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from . import report
    from .config import resolve_profile_name
    from .results import read_summary

    profile = resolve_profile_name(a.profile)
    s = read_summary(profile)
    if a.headline:
        print("\n\n".join(p for p in (report.headline_table(s), report.defense_table(s)) if p) or report.render(profile))
    else:
        print(report.render(profile))
    if a.write_readme and not report.write_readme(profile):
        print(f"README.md has no results block for {profile}", file=sys.stderr)
        return 1
    return 0


def _parse_until(cfg: dict, text: str | None) -> int | None:
    """'2x' or a step number -> a milestone step (None: the variant's target)."""
    from . import defense_run as R
    from .training import milestone_steps

    if text is None:
        return None
    ms = milestone_steps(cfg["defense"]["train"])
    try:
        step = round(float(text[:-1]) * ms[0]) if text.endswith("x") else int(text)
    except ValueError:
        step = None
    if step not in ms:
        raise SystemExit(f"--until {text}: not a milestone; the profile's are "
                         + ", ".join(f"{R.budget_label(cfg, m)} (step {m})" for m in ms))
    return step


def cmd_train_variant(a: argparse.Namespace) -> int:
    """Defense variants outside the notebook, into notebook 03's cache: one or more to their target (or
    ``--until`` a milestone), or ``--plan``: every variant of ``[defense] run`` to 1x, then the
    ``budget_curve`` variants milestone by milestone, so that an interrupted queue leaves complete curves."""
    from . import defense_run as R
    from . import pipeline as P
    from .config import ProfileError, load_config
    from .models import load_model

    try:
        cfg = load_config(a.profile)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 2
    names = a.variant or (R.default_variants(cfg) if a.plan else None)
    if not names:
        print("name a variant (--variant NAME) or train the whole queue (--plan)", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in cfg["defense"]["variants"]]
    if unknown:
        print(f"unknown variant(s) {unknown}: the profile defines {', '.join(cfg['defense']['variants'])}", file=sys.stderr)
        return 2
    until = _parse_until(cfg, a.until)
    committed = R.committed_progress(cfg)
    if a.plan and until is None:
        plan = R.train_plan(cfg, names, R.recorded_milestones(cfg, committed))
    else:
        plan = [(n, until or R.target_step(cfg, n)) for n in names]
    base = load_model(cfg)
    tv = P.filtered_train_val(cfg, base)
    base_lp_val = P.logprobs_cached(cfg, base, tv.harmless_val, desc="base harmless val")
    del base
    factory = R.periodic_eval(cfg, tv, base_lp_val)
    measure = _checkpoint_measurer(cfg, committed) if a.evaluate else None
    for name, step in plan:
        print(f"== {name} until step {step} ({R.budget_label(cfg, step)})", flush=True)
        record = R.train_variant(cfg, name, evaluate_factory=factory, until=step)
        print({k: record[k] for k in ("steps", "seconds", "tokens", "tokens_per_s")}, record["evals"][-1:], flush=True)
        gc.collect()  # the student, its optimiser and wrappers hold cycles: free them before the next model loads
        if measure is not None:
            measure(name, step)
    return 0


def _checkpoint_measurer(cfg, committed=None):
    """``measure(name, step)``: notebook 03's per-checkpoint measurements (utility and attack screen) into
    their cache, printing the headline numbers. The original's test-set completions and harmless log-probs
    are computed (or read from the cache) once, on the first call. A milestone below the variant's last whose
    very measurement the committed progress file holds is carried, not re-measured
    (``defense_run.milestone_budget``)."""
    from . import defense_run as R
    from . import pipeline as P
    from .models import load_model

    sets = P.test_sets(cfg)
    base: dict[str, Any] = {}

    def original() -> tuple[list, Any]:
        if not base:
            model = load_model(cfg)
            base["lp"] = P.logprobs_cached(cfg, model, sets.harmless, desc="base harmless")
            base["harmless"] = P.evaluate_model(cfg, model, sets, None, None, "original")["completions"]["harmless"]
            del model
            gc.collect()
        return base["harmless"], base["lp"]

    def measure(name: str, step: int) -> None:
        print(f"== measure {name} at step {step} ({R.budget_label(cfg, step)})", flush=True)
        entry, _ = R.milestone_budget(cfg, name, step, sets, original, committed)
        gc.collect()
        print(R.budget_headline(entry), flush=True)

    return measure


def cmd_progress(a: argparse.Namespace) -> int:
    """The background queue's progress from the caches alone (no model): each variant's milestones and the
    headline numbers of every checkpoint already measured; ``--write`` keeps them in
    ``results/<profile>/queue_progress.json`` so that measurements finished in one session can be committed
    before notebook 03 gathers them all, and rewrites the README's progress block from it. Entries of that file
    which the cache lacks (a new machine) are kept, marked as carried (``defense_run.merge_progress``)."""
    import json

    from . import defense_run as R
    from . import pipeline as P
    from .config import ProfileError, load_config
    from .results import git_commit, progress_path

    try:
        cfg = load_config(a.profile)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 2
    out = progress_path(cfg["profile"])  # results_dir creates the folder
    committed = R.committed_progress(cfg)
    if a.check_dtype:  # the queue's first step: nothing else is read or computed
        change = R.dtype_change(cfg, committed)
        print(change or f"{cfg['profile']}: this machine computes in {cfg['model']['dtype']}, as the committed progress",
              file=sys.stderr if change else sys.stdout)
        return 2 if change else 0
    sets = P.test_sets(cfg)
    progress = R.queue_progress(cfg, sets)
    original = R.original_rates(cfg, sets)
    for name, v in progress.items():  # a milestone the queue carried (the same measurement, committed) is not pending
        v["unmeasured"] = [m for m in v["unmeasured"] if R.carried_entry(cfg, name, m, sets, committed) is None]
    # a new machine's empty cache erases nothing; a committed run of another dtype is kept apart
    progress, notes = R.merge_progress(committed, progress, R.dir_dtypes(cfg, list(progress)))
    for line in notes:
        print(line)
    if original is None and committed is not None:
        original = committed.get("original")  # a new machine's cache lacks it: the committed one, with its dtype
    if original is not None:
        print(f"original ({original['dtype']}): " + ", ".join(f"{k} {original[key]['rate']}" for k, key in P.RATE_KEYS.items()))
    for name, v in progress.items():
        done = ", ".join(f"{R.budget_label(cfg, m)}" for m in v["milestones"]) or "none"
        print(f"{name}: milestones trained {done} (target {R.budget_label(cfg, v['target_step'])})"
              + (f"; not yet measured: {', '.join(R.budget_label(cfg, m) for m in v['unmeasured'])}" if v["unmeasured"] else ""))
        for label, e in v["budget"].items():
            print(f"  {label}: " + ", ".join(f"{k} {x}" for k, x in R.budget_headline(e).items()))
    if a.write:
        doc = {"profile": cfg["profile"], "read_at_commit": git_commit(),
               "note": "read from the run cache by `refusal-rank progress --write`, completed by this file's earlier "
                       "entries that the cache lacks (each marked carried_from_commit); notebook 03 gathers the same "
                       "entries into summary.json", "original": original, "variants": progress}
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
        from .report import write_readme

        if write_readme(cfg["profile"], ("progress",)):
            print("wrote README.md's progress block")
    return 0


def cmd_audit(argv: Sequence[str]) -> int:
    try:
        from . import audit
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.audit":
            raise
        print("refusal-rank audit: this checkout has no refusal_rank.audit module yet (it lands with the audit's change).",
              file=sys.stderr)
        return 2
    return int(audit.main(list(argv)) or 0)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refusal-rank", description="Refusal rank: the notebook series and its outputs.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the notebook series (run_all.sh): skips finished notebooks, --fresh reruns")
    _profile_arg(p)
    p.add_argument("--from", dest="from_", metavar="NN")
    p.add_argument("--to", metavar="NN")
    p.add_argument("--only", metavar="NN")
    p.add_argument("--fresh", action="store_true", help="empty the profile's caches first")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("figures", help="redraw every figure from results/<profile>/ alone (no model)")
    _profile_arg(p)
    p.add_argument("--out", default=None, help="write here instead of figures/<profile>/")
    p.add_argument("--only", nargs="*", metavar="NAME", help="figure names, e.g. 04_1_refusal_vs_k")
    p.set_defaults(fn=cmd_figures)

    p = sub.add_parser("report", help="the README's tables from results/<profile>/summary.json")
    _profile_arg(p)
    p.add_argument("--write-readme", action="store_true", help="replace the profile's generated blocks in README.md")
    p.add_argument("--headline", action="store_true", help="only the headline tables")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("train-variant", help="train defense variants into notebook 03's cache (resumes)")
    _profile_arg(p)
    p.add_argument("--variant", action="append", help="a variant of [defense.variants] (repeatable)")
    p.add_argument("--until", default=None, help="a milestone: '1x', '2x', ... or its step")
    p.add_argument("--plan", action="store_true", help="every variant of [defense] run to 1x, then the budget curve")
    p.add_argument("--evaluate", action="store_true",
                   help="after each milestone, notebook 03's utility and attack screen of that checkpoint (cached)")
    p.set_defaults(fn=cmd_train_variant)

    p = sub.add_parser("progress", help="what the background queue has trained and measured (caches only, no model)")
    _profile_arg(p)
    p.add_argument("--write", action="store_true", help="also write results/<profile>/queue_progress.json")
    p.add_argument("--check-dtype", action="store_true",
                   help="only check that this machine computes in the committed progress file's dtype (exit 2 if not)")
    p.set_defaults(fn=cmd_progress)

    sub.add_parser("audit", help="the audit; its own options follow (refusal-rank audit --help)", add_help=False)
    return ap


def _check_profile(name: str | None) -> None:
    """A read-only command (report, figures) names a profile that a config defines, or stops here."""
    from .config import ProfileError, available_profiles, resolve_profile_name

    profile = resolve_profile_name(name)
    if profile not in available_profiles():
        raise ProfileError(f"unknown profile {profile!r}: choose one of {', '.join(available_profiles())}.")


def _checked(fn, *args):
    """``fn(*args)`` once :func:`refusal_rank.config.check_clone` found this the clone meant."""
    from .config import check_clone

    check_clone()
    return fn(*args)


def main(argv: Sequence[str] | None = None) -> int:
    """Every bad input ends in one sentence on stderr and a non-zero exit (:mod:`refusal_rank.errors`)."""
    from .errors import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "audit":  # its options are the audit's own
        return run_main("refusal-rank audit", _checked, cmd_audit, argv[1:])
    a = parser().parse_args(argv)
    # run from a clone whose .venv is another clone's: one sentence, before anything runs (config.check_clone)
    rc = run_main(f"refusal-rank {a.command}", _checked, lambda: None)
    if rc:
        return rc
    if a.command in ("report", "figures"):
        rc = run_main(f"refusal-rank {a.command}", _check_profile, a.profile)
        if rc:
            return rc
    return run_main(f"refusal-rank {a.command}", a.fn, a)


if __name__ == "__main__":
    sys.exit(main())
