"""The ``report`` and ``analyze`` subcommands, kept apart from main.py so that it only registers them.

Nothing heavy is imported here at module level: ``dlfa --help`` must stay fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add ``report`` and ``analyze {similarity,ablate}`` to the ``dlfa`` subparsers."""
    from dlfa.cli.main import _add_train_options, _languages

    report = sub.add_parser("report", help="tables (Markdown/CSV/LaTeX) and figures from finished runs, over seeds")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep folders (searched recursively)")
    report.add_argument("--output", help="where to write (default: the first RUN_DIR/report)")
    report.add_argument("--groups", help='JSON file {"group": ["lang", ...]} for Table 2 (default: built-in groups)')
    report.add_argument("--published", choices=["auto", "mbert", "none"], default="auto",
                        help="print the paper's mBERT numbers beside ours: auto = for bert-base-multilingual-cased "
                             "rows only; mbert = beside every model; none")

    analyze = sub.add_parser("analyze", help="analyses: per-layer cross-lingual similarity, layer re-init ablation")
    kinds = analyze.add_subparsers(dest="analysis", required=True, parser_class=type(analyze))

    sim = kinds.add_parser("similarity", help="cosine and linear CKA, en vs each language, per layer")
    sim.add_argument("--model", required=True,
                     help="a run folder (its best/ model), a saved DLFA model folder, or an encoder name/folder "
                          "(e.g. embedded:multilingual-e5-small)")
    sim.add_argument("--task", default="xnli", help="xnli or pawsx (line-parallel TSV), udpos (PUD treebanks)")
    sim.add_argument("--data-dir", required=True)
    sim.add_argument("--languages", type=_languages, help="comma-separated targets (default: every parallel one)")
    sim.add_argument("--split", default="test")
    sim.add_argument("--max-sentences", type=int, default=500, help="first N parallel sentences (default 500)")
    sim.add_argument("--max-length", type=int, default=128)
    sim.add_argument("--batch-size", type=int, default=32)
    sim.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    sim.add_argument("--output", default="similarity", help="folder for CSVs, plots and similarity.md")

    ablate = kinds.add_parser("ablate", help="re-initialise encoder blocks before fine-tuning; compare transfer gap")
    ablate.add_argument("--reinit-layers", required=True,
                        help="blocks to re-initialise, 1-based like hidden_states (e.g. 1-4, or 1,3,5-6)")
    _add_train_options(ablate)


def _report(args: argparse.Namespace) -> int:
    from dlfa.reporting.report import ReportOptions, load_groups, write_report

    options = ReportOptions(published=args.published)
    if args.groups:
        options.groups = load_groups(args.groups)
        options.groups_source = f"from {args.groups}"
    written = write_report(args.runs, args.output, options)
    print(written["table1"])
    print(f"{written['runs']} runs; {len(written['skipped'])} unfinished skipped; report in {written['output']}/report.md")
    return 0


def _similarity(args: argparse.Namespace) -> int:
    from dlfa.analysis.similarity import run_similarity, summary_markdown
    from dlfa.errors import DlfaInputError
    from dlfa.reporting.report import command_line

    for option, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise DlfaInputError(f"must be a positive integer, got {value}", option=option)
    result = run_similarity(
        args.model, args.task, args.data_dir, args.languages, args.output, split=args.split,
        max_sentences=args.max_sentences, batch_size=args.batch_size, max_length=args.max_length,
        device="cpu" if args.cpu else None, command=command_line(),
    )
    print(summary_markdown(result))
    print(f"{result.sentences} sentences per language, {result.seconds:.1f} s; written to {args.output}/")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from dlfa.analysis.ablate import parse_layer_range, run_ablation
    from dlfa.errors import DlfaInputError
    from dlfa.reporting.report import command_line
    from dlfa.training.config import TrainConfig

    layers = parse_layer_range(args.reinit_layers)
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    skip = ("command", "analysis", "config", "overwrite", "resume", "reinit_layers")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    config = TrainConfig.from_dict({**base, **given})
    if not given.get("output_dir") and not base.get("output_dir"):
        raise DlfaInputError("an output folder is required", option="--output")
    result = run_ablation(config, layers, config.output_dir, overwrite=args.overwrite, resume=args.resume,
                          command=command_line())
    print(result["markdown"])
    return 0


def _analyze(args: argparse.Namespace) -> int:
    return {"similarity": _similarity, "ablate": _ablate}[args.analysis](args)


HANDLERS = {"report": _report, "analyze": _analyze}
