"""The ``dlfa`` command line. It only parses options into configs and calls the recipes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dlfa.errors import DlfaInputError
from dlfa.training.config import DEFAULT_MODEL

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2) like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DlfaInputError(f"{self.prog}: {message}")


def _languages(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fuse_layer(text: str) -> int | None:
    if text.lower() in ("none", "baseline"):
        return None
    try:
        return int(text)
    except ValueError:
        raise DlfaInputError(f"must be an integer layer number or 'none', got {text!r}", option="--fuse-layer") from None


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `sweep`: everything of a TrainConfig except task, output, layer and seed."""
    p.add_argument("--model", help="embedded:multilingual-e5-small (default), a Hugging Face id or a local folder")
    p.add_argument("--reduction", type=int, help="AIF bottleneck reduction ratio r (default 4)")
    p.add_argument("--languages", type=_languages, help="comma-separated target languages, or 'all' (default)")
    p.add_argument("--train-split", help="split of the English file to train on (default train; XNLI/PAWS-X here: dev)")
    p.add_argument("--dev-split", help="split used for checkpoint selection (default dev)")
    p.add_argument("--dev-holdout", type=float,
                   help="fraction held out for selection when train and dev split are the same file (default 0.1)")
    p.add_argument("--allow-leaky-evaluation", action="store_true", default=None,
                   help="score on the training file's translations anyway; the report marks those scores")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="tokenize again instead of reusing cached features")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-length", type=int)
    p.add_argument("--eval-every", type=int, help="optimizer steps between English-dev evaluations (default: each epoch)")
    p.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints (default: each evaluation)")
    p.add_argument("--max-train-examples", type=int)
    p.add_argument("--max-dev-examples", type=int)
    p.add_argument("--max-eval-examples", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--freeze-embeddings", action="store_true", default=None)
    p.add_argument("--cpu", action="store_true", default=None)
    p.add_argument("--method", choices=["finetune", "xmixup"],
                   help="finetune (default: English fine-tuning) or xmixup (X-Mixup on parallel pairs, "
                        "docs/xmixup.md; sweep rows xmixup, xmixup+D_x)")
    p.add_argument("--xmixup-parallel", type=_languages,
                   help="X-Mixup pairs: target languages paired line by line with the English training file "
                        "(xnli, pawsx; e.g. de,fr), and/or parallel TSV files (LANG=FILE or FILE; udpos, panx: "
                        "source tokens, source tags, target tokens[, target tags])")
    p.add_argument("--xmixup-layers", type=_ints, help="mixing blocks 1..N, e.g. 1 or 3-4 (default: 1; tagging 4)")
    p.add_argument("--xmixup-alpha", type=float, help="source task-loss weight (default 0.4; tagging 0.8)")
    p.add_argument("--xmixup-schedule", choices=["inverse_sigmoid", "linear", "constant"],
                   help="scheduled sampling of mixed vs plain target passes (default inverse_sigmoid)")
    p.add_argument("--xmixup-schedule-k", type=float, help="inverse-sigmoid k (default: p = 0.5 at half of training)")
    p.add_argument("--xmixup-kl-weight", type=float, help="consistency KL weight (default 1)")
    p.add_argument("--xmixup-mse-weight", type=float, help="consistency MSE weight (default 1)")
    p.add_argument("--xmixup-lambda-max", type=float, help="lambda_0, the largest mixing ratio (default 0.5)")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON file with TrainConfig fields; options given here override it")
    p.add_argument("--task", help="udpos, panx, xnli or pawsx (see `dlfa tasks`)")
    p.add_argument("--data-dir", help="folder with the task's files (e.g. ../shared/data/udpos)")
    p.add_argument("--output", dest="output_dir", help="run folder to create")
    p.add_argument("--fuse-layer", type=_fuse_layer, default=argparse.SUPPRESS,
                   help="DLFA: fuse the last layer with this layer (1..N-1); 'none' = baseline")
    p.add_argument("--seed", type=int)
    _add_run_options(p)
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint (or skip it if it finished)")


def _ints(text: str) -> list[int]:
    """'1,2,5-7' -> [1, 2, 5, 6, 7]."""
    values: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part:
                low, high = part.split("-", 1)
                values.extend(range(int(low), int(high) + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise DlfaInputError(f"expected integers like 1,2,5-7, got {text!r}") from None
    return values


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=_languages, required=True, help="comma-separated tasks, e.g. udpos,panx")
    p.add_argument("--data-dir", help="the task's data folder (one task)")
    p.add_argument("--data-root", help="folder with one subfolder per task (udpos/, panx/, xnli/, pawsx/)")
    p.add_argument("--output", required=True,
                   help="sweep folder; cells are <task>/<model>/<row>/seed-<s>, row baseline, D_x, xmixup or xmixup+D_x")
    p.add_argument("--layers", type=_ints, help="fused layers, e.g. 4,8,11 or 1-11 (default: all 1..N-1)")
    p.add_argument("--seeds", type=_ints, default=[1, 2, 3], help="default 1,2,3")
    p.add_argument("--no-baseline", action="store_true", help="leave out the baseline row")
    p.add_argument("--parallel", type=int, default=1, help="cells run at once on this machine")
    p.add_argument("--ray-address", help="run each cell as a Ray task on this cluster ('auto', 'ray://host:10001')")
    p.add_argument("--cpus-per-run", type=float, default=1.0)
    p.add_argument("--gpus-per-run", type=float, default=0.0)
    _add_run_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dlfa", description="Zero-shot cross-lingual transfer with DLFA feature aggregation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="fine-tune on English, select on English dev, score target languages")
    _add_train_options(train)

    evaluate = sub.add_parser("evaluate", help="score a trained run (or saved model) on target languages")
    evaluate.add_argument("--run", required=True, help="a run folder (or the best/ model folder inside it)")
    evaluate.add_argument("--data-dir", help="task data folder (default: the run's)")
    evaluate.add_argument("--languages", type=_languages, help="comma-separated languages or 'all'")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--max-eval-examples", type=int)
    evaluate.add_argument("--output", help="write the metrics JSON here (default: print only)")

    demo = sub.add_parser("demo", help="baseline vs DLFA on the shipped POS sample with the embedded model")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--fuse-layer", type=int, default=8)
    demo.add_argument("--epochs", type=float, default=6)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--model", default=None)
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo output")

    sweep = sub.add_parser("sweep", help="tasks x {baseline, D_1..D_(N-1)} x seeds (with --method xmixup: xmixup, "
                                         "xmixup+D_x), resumable, local or on Ray")
    _add_sweep_options(sweep)

    from dlfa.cli import report_cli  # `report` and `analyze`; imports nothing heavy

    report_cli.add_parsers(sub)
    COMMANDS.update(report_cli.HANDLERS)
    sub.add_parser("tasks", help="list the tasks with their metrics and languages")

    download = sub.add_parser("download", help="fetch a task's official release, verify it, convert it for dlfa")
    download.add_argument("task", help="udpos, xnli, pawsx or panx (panx: a manual download, see --archive)")
    download.add_argument("--output", default="data", help="data folder; the task goes to OUTPUT/TASK (default: data)")
    download.add_argument("--archive", action="append", default=[],
                          help="use this local archive instead of downloading (repeatable); panx: AmazonPhotos.zip, "
                               "panx_dataset.tar, <lang>.tar.gz files or a folder of them")
    download.add_argument("--languages", type=_languages, help="comma-separated languages or 'all' (default: XTREME's)")
    download.add_argument("--mirror", help="base URL serving the archives by file name (or $DLFA_DOWNLOAD_MIRROR)")
    download.add_argument("--syntactic-words", action="store_true",
                          help="udpos: keep UD's syntactic words instead of XTREME's fused tokens")
    download.add_argument("--remove-archives", action="store_true", help="delete the downloaded archives afterwards")
    download.add_argument("--overwrite", action="store_true", help="replace a task folder not made by dlfa download")
    return parser


def _train(args: argparse.Namespace) -> int:
    from dlfa.training.config import TrainConfig
    from dlfa.training.recipe import recipe_class

    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("command", "config", "overwrite", "resume")}
    config = TrainConfig.from_dict({**base, **given})
    result = recipe_class(config.method)(config, overwrite=args.overwrite, resume=args.resume).run()
    _print_run_summary(result)
    return 0


def _print_run_summary(result: dict) -> None:
    from dlfa.reporting.tables import format_score, markdown_table

    metric = result["primary_metric"]
    rows = [[lang, format_score(m[metric])] + ([format_score(m["accuracy"])] if "accuracy" in m and metric != "accuracy" else [])
            for lang, m in result["languages"].items()]
    headers = ["language", metric] + (["accuracy"] if rows and len(rows[0]) == 3 else [])
    avg = result["average"]
    rows.append(["average", format_score(avg[metric])] + ([format_score(avg["accuracy"])] if len(headers) == 3 else []))
    print(markdown_table(headers, rows))


def _evaluate(args: argparse.Namespace) -> int:
    from dlfa.evaluation.run_eval import evaluate_run

    result = evaluate_run(args.run, data_dir=args.data_dir, languages=args.languages, batch_size=args.batch_size,
                          max_examples=args.max_eval_examples, output=args.output)
    _print_run_summary(result)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dlfa.training.demo import DemoConfig, run_demo

    config = DemoConfig(output_dir=args.output, fuse_layer=args.fuse_layer, epochs=args.epochs, seed=args.seed)
    if args.model:
        config.model = args.model
    run_demo(config, overwrite=args.overwrite)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from dlfa.training.sweep import SweepConfig, run_sweep

    if args.data_root:
        data_dirs = {task: str(Path(args.data_root) / task) for task in args.tasks}
    elif args.data_dir and len(args.tasks) == 1:
        data_dirs = {args.tasks[0]: args.data_dir}
    else:
        raise DlfaInputError("give --data-dir for one task or --data-root for several", option="--data-dir")
    sweep_keys = {"command", "tasks", "data_dir", "data_root", "output", "layers", "seeds", "no_baseline",
                  "parallel", "ray_address", "cpus_per_run", "gpus_per_run", "model"}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in sweep_keys}
    sweep = SweepConfig(
        tasks=args.tasks, data_dirs=data_dirs, output_dir=args.output, model=args.model or DEFAULT_MODEL,
        layers=args.layers, seeds=args.seeds, include_baseline=not args.no_baseline, train_overrides=overrides,
        parallel=args.parallel, ray_address=args.ray_address, cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run,
    )
    results = run_sweep(sweep)
    for record in results:
        score = f" {record['score']:.2f}" if "score" in record else ""
        print(f"{record['status']:>15}  {record['run_dir']}{score}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from dlfa.tasks import TASKS

    for task in TASKS.values():
        print(json.dumps({"task": task.name, "head": task.head, "metric": task.primary_metric,
                          "eval_split": task.eval_split, "labels": len(task.labels), "languages": list(task.languages)}))
    return 0


def _download(args: argparse.Namespace) -> int:
    from dlfa.data.download import download

    download(args.task, args.output, archives=args.archive, languages=args.languages, base_url=args.mirror,
             fused_forms=not args.syntactic_words, keep_archives=not args.remove_archives, overwrite=args.overwrite)
    return 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "demo": _demo, "sweep": _sweep, "tasks": _tasks,
            "download": _download}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except DlfaInputError as exc:
        print(f"dlfa: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dlfa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
