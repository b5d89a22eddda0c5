"""Command-line interface: a thin layer over the Python API.

User errors print one ``error: …`` line and exit 1; Ctrl-C exits 130 leaving no partial output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from pathlib import Path

from statprune.argtypes import positive_int
from statprune.bench import add_bench_parser, run_bench
from statprune.decision import add_report_parser, run_report
from statprune.errors import OptionsError, StatpruneError
from statprune.evaluate import add_eval_parser, run_eval
from statprune.export import add_export_parser, run_export
from statprune.gguf_export import add_gguf_parser, run_gguf
from statprune.guards import cli_option_names
from statprune.options import (
    RESEARCH,
    USER,
    add_budget_arguments,
    add_option_arguments,
    option_names,
    options_from_args,
)
from statprune.sweep import add_sweep_parser, run_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statprune", description="Shrink trained transformers without retraining (STAT)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="remove heads and FFN neurons, correct the next layers")
    c.add_argument("model", type=Path, help="Hugging Face model folder")
    c.add_argument("--data", type=Path, required=True, help="calibration data: .txt, .jsonl, .csv or folder")
    c.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    add_budget_arguments(c)
    c.add_argument("--samples", type=positive_int, default=512, help="calibration examples to draw")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--pack",
        action="store_true",
        help="join the texts and cut --seq-len token windows; --samples windows are drawn (for LMs)",
    )
    c.add_argument("--batch-size", type=positive_int, default=16)
    c.add_argument("--text-field", help="JSONL/CSV field holding the text (default: text)")
    c.add_argument("--pair-field", help="JSONL/CSV field holding the second text of a pair")
    c.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype to compress in and save; auto (default): compress in float32, save in the "
        "input checkpoint's dtype",
    )
    c.add_argument(
        "--uniform",
        action="store_true",
        help="same heads and neurons in every layer, saved as the stock architecture (standard config "
        "fields, no remote code; Llama, Mistral, Qwen2)",
    )
    add_option_arguments(c.add_argument_group("compression options"), names=option_names(USER))
    research = c.add_argument_group("research options (ablations; the defaults are the measured best)")
    add_option_arguments(research, names=option_names(RESEARCH))
    c.add_argument("--checkpoint-dir", type=Path, help="save progress after every layer into this folder")
    c.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="print the report of a compressed model")
    i.add_argument("model", type=Path)
    add_eval_parser(sub)
    add_sweep_parser(sub)
    add_export_parser(sub)
    add_gguf_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    return parser


def _compress(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import statprune
    from statprune.adapters import adapter_for
    from statprune.argtypes import resolve_device
    from statprune.calibration import read_examples
    from statprune.options import CompressionOptions
    from statprune.persist import (
        check_model_dir,
        check_output_dir,
        checkpoint_dtype,
        load_tokenizer,
        read_config,
    )
    from statprune.st_folder import read_modules

    fields = {k: getattr(args, k) for k in ("keep_flops", "keep_params", "keep_latency")}
    fields |= options_from_args(args)
    if args.uniform:
        if fields.get("allocation", "auto") not in ("auto", "uniform"):
            raise OptionsError("--uniform sets the allocation itself; drop --allocation")
        fields["allocation"] = "uniform"
    CompressionOptions(**fields).validate()
    if args.quiet or not sys.stderr.isatty():  # also transformers' bars ("Loading weights", …); not in logs
        transformers.utils.logging.disable_progress_bar()
    resolve_device(args.device)
    check_model_dir(args.model)
    check_output_dir(args.out, args.overwrite, source=args.model)
    config = read_config(args.model)
    adapter_for(config)
    read_modules(args.model)  # a broken sentence-transformers modules.json fails now, not at the save
    if args.uniform:
        from statprune.uniform import check_family

        check_family(config, bias_compensation=fields.get("bias_compensation", True))
    texts = read_examples(args.data, text_field=args.text_field, pair_field=args.pair_field)
    tokenizer = load_tokenizer(args.model)
    # auto: statistics from a float32 forward, weights saved in the checkpoint's own dtype
    out_dtype = checkpoint_dtype(args.model) if args.dtype == "auto" else args.dtype
    work_dtype = "float32" if args.dtype == "auto" else args.dtype
    model = statprune.load(args.model, dtype=getattr(torch, work_dtype))
    model, report = statprune.compress(
        model,
        tokenizer,
        texts,
        samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        pack=args.pack,
        inplace=True,
        progress=not args.quiet,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        **fields,
    )
    report.source_model = str(args.model.resolve())
    model.to(getattr(torch, out_dtype))
    out = statprune.save(
        model,
        args.out,
        tokenizer=tokenizer,
        report=report,
        overwrite=args.overwrite,
        source=args.model,
        calibration_data=args.data.name,
        stock=args.uniform,
    )
    print(report.summary())
    print(f"\nsaved to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from statprune.persist import load_report

    report = load_report(args.model)
    print(report.summary())
    if report.budget_kind == "latency" and report.options.get("round_to") == 1:
        from statprune.latency import ALIGN

        print(
            f"\nround_to=1 forces no multiple; the latency table prices FFN widths off a multiple of "
            f"{ALIGN} higher (measured), so a latency budget mostly keeps multiples of {ALIGN}."
        )
    experts = _expert_widths(args.model)
    if experts:
        shared = ", then the shared one" if any(e.shared for e in experts) else ""
        print(f"\nMoE layers, FFN neurons kept per expert (routed experts in order{shared}):")
        print("\n".join(f"{e.layer:>5}  {e.describe()}" for e in experts))
    return 0


def _expert_widths(folder: Path) -> list:
    """Per-expert widths of a saved MoE model, from its ``config.json`` (empty without experts)."""
    import json

    from statprune.model_card import expert_widths

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # the report is all there is to show
        return []
    return expert_widths(config.get("statprune_ops") if isinstance(config, dict) else None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network at run time
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    commands = {
        "compress": _compress,
        "info": _info,
        "eval": run_eval,
        "sweep": run_sweep,
        "export-onnx": run_export,
        "export-gguf": run_gguf,
        "bench": run_bench,
        "report": run_report,
    }
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        with warnings.catch_warnings(), _sigterm_as_interrupt():
            warnings.simplefilter("always")
            warnings.showwarning = _warn_once(set())
            with cli_option_names():  # messages name --flags, not the API's keywords
                return commands[args.command](args)
    except StatpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except _device_out_of_memory():
        print(
            "error: the device ran out of memory; lower --batch-size, use --layer-weighting residual "
            "(no backward pass), or --device cpu. Nothing was written",
            file=sys.stderr,
        )
        return 1


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's or ``kill``'s stop) handled as Ctrl-C while a command runs: the
    same clean-up, message and exit status (a sweep keeps its finished runs)."""

    def interrupt(_signum, _frame) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warn_once(shown: set[str]):
    """A ``warnings.showwarning`` that prints statprune's warnings as ``warning: …`` lines when
    they happen, each message once (a sweep meets the same one at every budget), and drops the
    libraries' warnings."""

    def show(message, category, _filename, _lineno, _file=None, _line=None) -> None:
        text = str(message)
        if category.__module__.startswith("statprune") and text not in shown:
            shown.add(text)
            print(f"warning: {text}", file=sys.stderr, flush=True)

    return show


def _device_out_of_memory() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError


if __name__ == "__main__":
    sys.exit(main())
