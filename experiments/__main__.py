"""Command line: ``python -m experiments --help``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .config import ConfigError, RunConfig, apply_overrides, describe_fields, parse_overrides, run_id
from .data import DatasetMissing

DEFAULT_RESULTS = os.path.join("experiments", "runs")  # git-ignored scratch; published results: experiments/results
PUBLISHED_RESULTS = os.path.join("experiments", "results")


def _parser() -> argparse.ArgumentParser:
    from .suites import DESCRIPTIONS, suite_names

    suites = "\n".join(f"  {n:<12} {DESCRIPTIONS.get(n, '')}" for n in suite_names())
    p = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Reproducible DropGrad experiments: run a suite or one configuration, then report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"suites:\n{suites}\n\nexamples:\n"
        "  python -m experiments quick\n"
        "  python -m experiments suite image --results-dir experiments/results\n"
        "  python -m experiments run task=fashion_mnist model=cnn drop_rate=0.2 epochs=3\n"
        "  python -m experiments report --results-dir experiments/results --out docs/results.md\n"
        "  python -m experiments config        # every config key, its type and default",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, results_default=DEFAULT_RESULTS):
        sp.add_argument("--results-dir", default=results_default, help=f"folder of JSONL results files (default {results_default})")
        sp.add_argument(
            "--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
            help="override config keys of every run (e.g. data_dir=/data device=cuda; a repeated --set adds to the list)",
        )
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    q = sub.add_parser("quick", help="the quick suite (digits, no download, < 5 min); prints a table")
    common(q)

    s = sub.add_parser("suite", help="run a named suite (finished runs are skipped)")
    s.add_argument("name", help="suite name (see the list below)")
    common(s)
    s.add_argument("--seeds", type=int, default=None, help="only seeds < N")
    s.add_argument("--group", default=None, help="only groups whose name contains this")
    s.add_argument("--setting", default=None, metavar="REGEX", help="only settings whose name matches this regular expression (re.search)")
    s.add_argument("--seed-only", type=int, default=None, metavar="K", help="only seed K (to run seeds in parallel processes)")
    s.add_argument("--budget", type=float, default=None, metavar="SECONDS", help="start no new run after this long")
    s.add_argument(
        "--finish-by", type=float, default=None, metavar="SECONDS",
        help="start only runs that the median time of their setting's (else group's) finished runs says end within "
        "this long; others are left for later and shorter ones tried (for sessions of fixed length)",
    )
    s.add_argument("--dry-run", action="store_true", help="list the runs and whether they are finished")
    s.add_argument("--allow-dirty", action="store_true", help="write into experiments/results from an uncommitted tree (runs marked dirty; the report excludes them)")

    r = sub.add_parser("run", help="run one configuration given as KEY=VALUE overrides of the defaults")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    r.add_argument("--results-dir", default=DEFAULT_RESULTS)
    r.add_argument("--no-progress", action="store_true")

    rp = sub.add_parser("report", help="write the Markdown report and PNG plots from results files")
    rp.add_argument("--results-dir", default=PUBLISHED_RESULTS)
    rp.add_argument("--out", default=os.path.join("docs", "results.md"))
    rp.add_argument("--figures", default=None, help="folder for PNGs (default: figures/results beside --out)")
    rp.add_argument("--suites", nargs="*", default=None, help="suites to include (default: the published ones)")

    cp = sub.add_parser("compare", help="check a rerun against the published runs of the same ids (exit 1 if it does not reproduce)")
    cp.add_argument("rerun_dir", help="results folder of the rerun (e.g. /tmp/check)")
    cp.add_argument("--against", default=PUBLISHED_RESULTS, help="published results folder (default: %(default)s)")
    cp.add_argument("--suite", required=True, help="the suite whose groups to compare")
    cp.add_argument("--group", default=None, help="only groups whose name contains this")
    cp.add_argument("--sigmas", type=float, default=3.0, help="tolerance in standard errors of the paired differences")

    sub.add_parser("config", help="list every config key with its type and default")
    sub.add_parser("list", help="list the suites and their number of runs")
    return p


def _suite_configs(name: str, args) -> list[RunConfig]:
    from .suites import get_suite

    configs = get_suite(name)
    if getattr(args, "seeds", None) is not None:
        configs = [c for c in configs if c.seed < args.seeds]
    if getattr(args, "setting", None):
        import re

        pattern = re.compile(args.setting)
        configs = [c for c in configs if pattern.search(c.name)]
    if getattr(args, "seed_only", None) is not None:
        configs = [c for c in configs if c.seed == args.seed_only]
    if getattr(args, "group", None):
        configs = [c for c in configs if args.group in c.group]
    if args.set:
        over = parse_overrides(args.set)
        configs = [apply_overrides(c, over) for c in configs]
    return configs


def _publishes(results_dir: str) -> bool:
    """Whether ``results_dir`` is the published results folder (experiments/results)."""
    return os.path.abspath(results_dir) == os.path.abspath(PUBLISHED_RESULTS)


def _run_suite(name: str, args) -> int:
    from .report import console_tables
    from .results import finished_ids, run_suite

    configs = _suite_configs(name, args)
    if not getattr(args, "dry_run", False) and _publishes(args.results_dir) and not getattr(args, "allow_dirty", False):
        from .results import tree_is_dirty

        if tree_is_dirty():
            print(
                f"error: refusing to write published results into {args.results_dir} from a tree with uncommitted "
                "changes to dropgrad/ or experiments/ (their runs could not be reproduced from a commit). Commit "
                "first, or pass --allow-dirty (the runs are then recorded as dirty and the report leaves them out).",
                file=sys.stderr,
            )
            return 2
    if getattr(args, "dry_run", False):
        done = finished_ids(args.results_dir)
        for c in configs:
            print(f"{'done' if run_id(c) in done else 'todo'}  {run_id(c)}  {c.suite:<10} {c.group:<32} {c.name:<20} seed {c.seed}")
        return 0
    t0 = time.time()
    counts = run_suite(configs, args.results_dir, progress=not args.no_progress, stop_after_s=getattr(args, "budget", None),
                       finish_by_s=getattr(args, "finish_by", None))
    print(
        f"\n{counts['ran']} runs done, {counts['skipped']} already finished, {counts['failed']} failed, "
        f"{counts['left']} left, in {time.time() - t0:.0f}s; results in {args.results_dir}/"
    )
    print(console_tables(configs, args.results_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "quick":
            return _run_suite("quick", args)
        if args.cmd == "suite":
            return _run_suite(args.name, args)
        if args.cmd == "run":
            from .results import run_suite

            cfg = apply_overrides(RunConfig(), args.overrides)
            counts = run_suite([cfg], args.results_dir, progress=not args.no_progress)
            from .results import load_runs

            runs = {r.id: r for r in load_runs([os.path.join(args.results_dir, f"{cfg.suite}.jsonl")])}
            if run_id(cfg) in runs:
                print(json.dumps(runs[run_id(cfg)].summary, indent=1, sort_keys=True))
            return 0 if counts["failed"] == 0 else 1
        if args.cmd == "report":
            from .report import write_report

            path = write_report(args.results_dir, args.out, args.figures, args.suites)
            print(f"wrote {path}")
            return 0
        if args.cmd == "compare":
            from .report import compare_results
            from .suites import get_suite

            text, ok = compare_results(args.rerun_dir, args.against, get_suite(args.suite), args.sigmas, args.group)
            print(text)
            return 0 if ok else 1
        if args.cmd == "config":
            print("RunConfig keys (override with KEY=VALUE):")
            print(describe_fields())
            return 0
        if args.cmd == "list":
            from .suites import DESCRIPTIONS, get_suite, suite_names

            for n in suite_names():
                cs = get_suite(n)
                print(f"{n:<12} {len({run_id(c) for c in cs}):>4} runs  {DESCRIPTIONS.get(n, '')}")
            return 0
    except (DatasetMissing, ConfigError) as exc:
        kind = "data set missing" if isinstance(exc, DatasetMissing) else "bad configuration"
        print(f"error ({kind}): {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; finished runs are saved, rerun the same command to resume", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
