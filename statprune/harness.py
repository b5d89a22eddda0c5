"""lm-evaluation-harness tasks on a model statprune loads: ``statprune eval MODEL --lm-eval-tasks``.

The bridge wraps the already-loaded model in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate``,
so a compressed folder is read by :func:`statprune.persist.load` (no ``trust_remote_code``) and the
numbers are lm-eval's own: its request building, its log-likelihood scoring, its ``acc`` /
``acc_norm`` and their standard errors (Gao et al., *A framework for few-shot language model
evaluation*, EleutherAI). Tasks are lm-eval YAML task files (or folders of them) given by path; no
dataset hub is needed when they read local data (``dataset_path: json`` with local ``data_files``).
A task file is lm-eval's format and is trusted as lm-eval trusts it (``!function`` entries import
Python next to the file).

Against a reference (``--against ORIGINAL``) both models answer the same examples, and for each
metric the change gets a paired 95 % interval over those examples
(:func:`statprune.evaluate.paired_change_interval`).

lm-eval is an optional dependency: ``pip install 'statprune[harness]'``. Only the standard library is
imported at module level.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from statprune.errors import DataError, ModelError, StatpruneError

__all__ = [
    "EXTRA",
    "HarnessMissingError",
    "HarnessResult",
    "add_harness_arguments",
    "harness_evaluate",
    "harness_paths",
    "run_harness_eval",
    "task_files",
]

EXTRA = "harness"  # pip install 'statprune[harness]'
DEFAULT_BATCH_SIZE = 32
YAML_SUFFIXES = (".yaml", ".yml")


class HarnessMissingError(StatpruneError):
    """lm-evaluation-harness is not installed."""


@dataclass
class HarnessRow:
    """One metric of one task. ``value`` / ``stderr`` are lm-eval's (its ``metric,filter`` keys;
    ``metric`` names the filter only when it is not ``none``); ``reference*`` and ``change*`` are
    set with a reference model. ``change_interval`` is the paired 95 % normal interval of the
    per-example difference (model − reference) over the ``n`` shared examples."""

    task: str
    metric: str
    n: int
    value: float
    stderr: float | None = None
    reference: float | None = None
    reference_stderr: float | None = None
    change: float | None = None
    change_interval: tuple[float, float] | None = None


@dataclass
class HarnessResult:
    """lm-eval metrics of every task run: ``rows`` in task order, then metric order."""

    rows: list[HarnessRow]
    task_files: list[str]
    num_fewshot: dict[str, int] = field(default_factory=dict)
    limit: int | None = None
    lm_eval_version: str | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        with_ref = any(r.reference is not None for r in self.rows)
        head = f"{'task':<24} {'metric':<10} {'n':>6}  {'model':<17}"
        if with_ref:
            head += f" {'reference':<17} change (95% CI, paired)"
        lines = [f"lm-eval {self.lm_eval_version or ''} tasks".replace("  ", " "), head]

        def pm(value: float | None, err: float | None) -> str:
            if value is None:
                return "-"
            return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")

        for r in self.rows:
            line = f"{r.task:<24} {r.metric:<10} {r.n:>6}  {pm(r.value, r.stderr):<17}"
            if with_ref:
                line += f" {pm(r.reference, r.reference_stderr):<17}"
                if r.change is not None:
                    line += f" {r.change:+.4f}"
                    if r.change_interval is not None:
                        lo, hi = r.change_interval
                        line += f" ({lo:+.4f} to {hi:+.4f})"
            lines.append(line.rstrip())
        shots = sorted(set(self.num_fewshot.values()))
        note = "zero-shot" if shots == [0] else f"{', '.join(map(str, shots))}-shot"
        lines.append(f"({note}; ± is lm-eval's standard error)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ lm-eval


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise HarnessMissingError(
            f"--lm-eval-tasks needs lm-evaluation-harness: pip install 'statprune[{EXTRA}]'"
        ) from None
    return lm_eval


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs every step at INFO and warns that the model is passed as an object (which is
    what this bridge means to do); only its errors are shown meanwhile. No dataset hub."""
    from contextlib import ExitStack
    from unittest import mock

    _require_lm_eval()

    from datasets import utils as datasets_bars
    from lm_eval import evaluator

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = not datasets_bars.are_progress_bars_disabled()
    datasets_bars.disable_progress_bars()  # "Generating test split" for every task file
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with ExitStack() as stack:
        # the results' provenance fields, unused here: `git describe` prints "fatal: not a git
        # repository" outside one, and torch's collect_env spends seconds in subprocesses
        for name, stub in (("get_git_commit_hash", lambda: None), ("add_env_info", lambda storage: None)):
            if hasattr(evaluator, name):
                stack.enter_context(mock.patch.object(evaluator, name, stub))
        try:
            yield
        finally:
            logger.setLevel(level)
            if bars:
                datasets_bars.enable_progress_bars()


def task_files(specs: str | Sequence[str | Path]) -> list[Path]:
    """``a.yaml,dir/`` (or a list) -> the task YAML files: a file as given, a folder as every
    ``*.yaml`` / ``*.yml`` below it that defines a ``task`` (templates and groups are left out;
    give a group's file to run the group). Each file is parsed with lm-eval's own YAML loader.

    Raises DataError (one line) for a path that does not exist, a file that is not YAML or does
    not parse, a file with neither ``task`` nor ``group``, or a folder without tasks;
    HarnessMissingError when lm-eval is not installed.
    """
    _require_lm_eval()
    if isinstance(specs, str | Path):
        specs = [s.strip() for s in str(specs).split(",")]
    out: list[Path] = []
    for spec in specs:
        if not str(spec):
            raise DataError("--lm-eval-tasks: an empty entry; give TASK.yaml[,TASK.yaml|FOLDER...]")
        path = Path(spec).expanduser()
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.suffix in YAML_SUFFIXES and p.is_file()]
            tasks = [p for p in found if "task" in _read_task_yaml(p, strict=False)]
            if not tasks:
                raise DataError(f"--lm-eval-tasks: no lm-eval task file (*.yaml with a 'task' key) in {path}")
            out += tasks
        elif path.is_file():
            if path.suffix not in YAML_SUFFIXES:
                raise DataError(f"--lm-eval-tasks: {path} is not a YAML task file (.yaml or .yml)")
            config = _read_task_yaml(path, strict=True)
            if "task" not in config and "group" not in config:
                raise DataError(f"--lm-eval-tasks: {path} defines neither 'task' nor 'group'")
            out.append(path)
        else:
            raise DataError(f"--lm-eval-tasks: {path} does not exist; give lm-eval task files or folders")
    return list(dict.fromkeys(p.resolve() for p in out))


def _read_task_yaml(path: Path, strict: bool) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=False)
    except Exception as exc:  # yaml's errors, a missing include, an include cycle
        if not strict:
            return {}
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"--lm-eval-tasks: cannot read {path}: {reason[:300]}") from None
    return config


def _load_tasks(files: Sequence[Path]):
    """lm-eval Task objects for the files (their data is read now: a broken ``data_files`` fails
    here, before any model runs)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=sorted({str(p.parent) for p in files}), include_defaults=False)
    try:
        return manager, manager.load([str(p) for p in files])
    except Exception as exc:  # lm-eval and datasets raise many kinds for a task that cannot load
        reason = " ".join(str(exc).split()) or type(exc).__name__
        names = ", ".join(p.name for p in files)
        raise DataError(f"--lm-eval-tasks: cannot load {names}: {reason[:300]}") from None


def _check_model(model: Any, which: str) -> None:
    from statprune.adapters import is_causal_lm

    if not is_causal_lm(model):
        raise ModelError(
            f"lm-eval tasks score a language model's next-token log-likelihoods, but {which} is a "
            f"{type(model).__name__}; give a …ForCausalLM folder (or use --data for this model)"
        )


def _run_one(model, tokenizer, files, batch_size: int, limit: int | None, num_fewshot: int | None):
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise ModelError(
            "the tokenizer has neither a BOS nor an EOS token, which lm-eval needs before an empty context"
        )
    with _quiet_lm_eval():
        manager, _ = _load_tasks(files)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[str(p) for p in files],
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=True,  # per-item scores for the paired interval; seeds: lm-eval's defaults
        )


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metrics(results: dict[str, Any]) -> list[tuple[str, str, str, float, float | None]]:
    """``(task, metric label, lm-eval key, value, stderr)`` for every numeric metric."""
    out = []
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or _number(value) is None:
                continue
            label = metric if filt == "none" else f"{metric},{filt}"
            out.append((task, label, key, float(value), _number(values.get(f"{metric}_stderr,{filt}"))))
    return out


def _per_example(results: dict[str, Any], task: str, key: str) -> dict[int, float]:
    metric, _, filt = key.partition(",")
    return {
        s["doc_id"]: float(s[metric])
        for s in results.get("samples", {}).get(task, [])
        if s.get("filter", "none") == filt and _number(s.get(metric)) is not None
    }


def harness_evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str | Path],
    reference=None,
    reference_tokenizer=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> HarnessResult:
    """Run lm-eval tasks on ``model`` (and ``reference``, the same examples) and gather the metrics.

    ``tasks``: task YAML files or folders (see :func:`task_files`). ``limit`` keeps each task's
    first N examples (lm-eval's ``--limit``); ``num_fewshot`` overrides the task files' (default:
    theirs, else 0). Metrics are lm-eval's, e.g. ``acc`` (fraction of examples whose highest
    log-likelihood choice is the gold one) and ``acc_norm`` (the same with log-likelihoods divided by
    the choices' lengths in characters), each with lm-eval's standard error.

    Raises HarnessMissingError without lm-eval; ModelError for a model (or reference) that is not a
    causal LM; DataError for task files that do not exist, parse or load.
    """
    import time

    lm_eval = _require_lm_eval()
    files = task_files(tasks)
    _check_model(model, "the model")
    if reference is not None:
        _check_model(reference, "the reference model")
    with _quiet_lm_eval():
        _load_tasks(files)  # fail on the task files before the models run
    start = time.perf_counter()
    mine = _run_one(model, tokenizer, files, batch_size, limit, num_fewshot)
    theirs = None
    if reference is not None:
        ref_tok = tokenizer if reference_tokenizer is None else reference_tokenizer
        theirs = _run_one(reference, ref_tok, files, batch_size, limit, num_fewshot)
    rows = []
    ref_metrics = {} if theirs is None else {(t, k): (v, e) for t, _, k, v, e in _metrics(theirs)}
    for task, label, key, value, err in _metrics(mine):
        row = HarnessRow(task, label, int(mine["n-samples"].get(task, {}).get("effective", 0)), value, err)
        if (task, key) in ref_metrics:
            from statprune.evaluate import paired_change_interval

            row.reference, row.reference_stderr = ref_metrics[task, key]
            row.change = value - row.reference
            a, b = _per_example(mine, task, key), _per_example(theirs, task, key)
            shared = sorted(a.keys() & b.keys())
            if shared:
                import torch

                row.change_interval = paired_change_interval(
                    torch.tensor([a[i] for i in shared]), torch.tensor([b[i] for i in shared])
                )
        rows.append(row)
    return HarnessResult(
        rows=rows,
        task_files=[str(p) for p in files],
        num_fewshot={k: int(v) for k, v in mine.get("n-shot", {}).items()},
        limit=limit,
        lm_eval_version=getattr(lm_eval, "__version__", None),
        seconds=round(time.perf_counter() - start, 3),
    )


def harness_paths(
    model_dir: str | Path,
    tasks: str | Sequence[str | Path],
    against: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    num_fewshot: int | None = None,
    device: str | None = "auto",
    dtype: str | None = None,
) -> HarnessResult:
    """:func:`harness_evaluate` on folders: each model (compressed or not) loads with
    :func:`statprune.persist.load` and its own tokenizer; ``dtype`` is a torch dtype name."""

    from statprune.argtypes import resolve_device, resolve_dtype
    from statprune.persist import check_model_dir, load, load_tokenizer

    with _quiet_lm_eval():  # a missing extra or a bad task file (or its data) fails before the models load
        _load_tasks(task_files(tasks))
    check_model_dir(Path(model_dir))
    if against is not None:
        check_model_dir(Path(against))
    torch_dtype = resolve_dtype(dtype)
    target = str(resolve_device(device))
    model = load(model_dir, device=target, dtype=torch_dtype)
    _check_model(model, str(model_dir))
    reference = ref_tok = None
    if against is not None:
        reference = load(against, device=target, dtype=torch_dtype)
        _check_model(reference, str(against))
        ref_tok = load_tokenizer(against)
    return harness_evaluate(
        model,
        load_tokenizer(model_dir),
        tasks,
        reference=reference,
        reference_tokenizer=ref_tok,
        batch_size=batch_size,
        limit=limit,
        num_fewshot=num_fewshot,
    )


# ------------------------------------------------------------------------------------------ CLI


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """``eval``'s lm-eval options (the model, ``--against``, ``--samples`` (lm-eval's limit),
    ``--batch-size``, ``--device``, ``--dtype`` and ``--json`` are eval's own)."""
    group = parser.add_argument_group(f"lm-evaluation-harness tasks (pip install 'statprune[{EXTRA}]')")
    group.add_argument(
        "--lm-eval-tasks",
        metavar="TASK.yaml[,…]",
        help="run lm-eval task files (or folders of them; local data, e.g. dataset_path: json) "
        "instead of --data; --samples keeps each task's first N examples",
    )
    group.add_argument(
        "--num-fewshot",
        type=int,
        metavar="K",
        help="lm-eval: examples shown before each question (default: the task's, else 0)",
    )


def run_harness_eval(args: argparse.Namespace) -> int:
    """``statprune eval MODEL --lm-eval-tasks …``: print the table and, with ``--json``, write it."""
    if getattr(args, "data", None) is not None:
        raise DataError("give --data or --lm-eval-tasks, not both (run eval once for each)")
    if getattr(args, "fail_below", None):
        raise DataError("--fail-below watches --data metrics; it does not apply to --lm-eval-tasks")
    if getattr(args, "task", "auto") not in ("auto", "lm"):
        raise DataError(f"--lm-eval-tasks evaluates a causal LM; drop --task {args.task}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise DataError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    result = harness_paths(
        args.model,
        args.lm_eval_tasks,
        against=args.against,
        batch_size=args.batch_size,
        limit=args.samples,
        num_fewshot=args.num_fewshot,
        device=args.device,
        dtype=args.dtype,
    )
    print(result.summary())
    from statprune.evaluate import write_eval_json

    write_eval_json(args, {"task": "lm-eval", "lm_eval": result.to_dict()})
    return 0
