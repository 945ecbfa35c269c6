"""The ``dlfa`` command line: options generated from the config dataclasses, and a thin handler per command.

Parsing and validation import nothing heavy (no torch, no model code), so a bad option is refused at once; the
handler of a command imports what it needs only after its config is valid. Every problem with the user's input,
and every operating-system error (a permission, a full disk, a read-only file system), is one line on stderr with
exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dlfa.errors import DlfaInputError
from dlfa.options import parse_config

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    name: str  # "train", "analyze ablate"
    help: str
    configs: Callable[[], tuple[type, ...]]  # the dataclasses whose fields are the options (imported lazily)
    handler: Callable[[dict[str, Any]], int]
    exclude: tuple[str, ...] = ()
    resume_hint: str | None = None  # said on Ctrl-C


# -- handlers: build the config from the given options, call the library, print a summary ----------------------


def _split(given: dict[str, Any], config_class: type) -> dict[str, Any]:
    names = config_class.field_names()
    return {k: v for k, v in given.items() if k in names}


def _train_configs() -> tuple[type, ...]:
    from dlfa.configs import RunControl
    from dlfa.training.config import TrainConfig

    return TrainConfig, RunControl


def _train(given: dict[str, Any]) -> int:
    from dlfa.configs import RunControl
    from dlfa.training.config import TrainConfig

    control = parse_config(RunControl, given)
    config = parse_config(TrainConfig, _split(given, TrainConfig), file=control.config)
    config.check_paths()  # before the heavy imports below: a wrong folder is refused at once
    from dlfa.training.recipe import end_process_group, recipe_class

    recipe = recipe_class(config.method)(config, overwrite=control.overwrite, resume=control.resume)
    result = recipe.run()
    del recipe  # before the process group ends: the model wrapper holds it
    end_process_group()
    if _main_process():
        _print_run_summary(result)
    return 0


def _main_process() -> bool:
    """Of several data-parallel processes (torchrun), only the first prints results."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _print_run_summary(result: dict) -> None:
    from dlfa.reporting.tables import format_score, markdown_table

    metric = result["primary_metric"]
    extra = ["accuracy"] if metric != "accuracy" and all("accuracy" in m for m in result["languages"].values()) else []
    rows = [[lang, format_score(m[metric])] + [format_score(m[e]) for e in extra]
            for lang, m in result["languages"].items()]
    avg = result["average"]
    rows.append([f"average ({len(rows)} languages)", format_score(avg[metric])] + [format_score(avg[e]) for e in extra])
    print(markdown_table(["language", metric, *extra], rows))


def _evaluate_configs() -> tuple[type, ...]:
    from dlfa.configs import EvaluateConfig

    return (EvaluateConfig,)


def _evaluate(given: dict[str, Any]) -> int:
    from dlfa.configs import EvaluateConfig

    config = parse_config(EvaluateConfig, given)
    from dlfa.evaluation.run_eval import evaluate_run

    _print_run_summary(evaluate_run(config))
    return 0


def _demo_configs() -> tuple[type, ...]:
    from dlfa.training.config import DemoConfig

    return (DemoConfig,)


def _demo(given: dict[str, Any]) -> int:
    from dlfa.training.config import DemoConfig

    config = parse_config(DemoConfig, given)
    from dlfa.training.demo import run_demo

    run_demo(config)
    return 0


def _sweep_configs() -> tuple[type, ...]:
    from dlfa.training.config import SweepConfig, TrainOptions

    return SweepConfig, TrainOptions


def _sweep(given: dict[str, Any]) -> int:
    from dlfa.training.config import SweepConfig, TrainOptions

    config = parse_config(SweepConfig, _split(given, SweepConfig), fixed={"train": _split(given, TrainOptions)})
    from dlfa.training.sweep import run_sweep

    summary = run_sweep(config)
    return 0 if not summary["failed"] else 1


def _tasks_configs() -> tuple[type, ...]:
    from dlfa.configs import TasksConfig

    return (TasksConfig,)


def _tasks(given: dict[str, Any]) -> int:
    from dlfa.configs import TasksConfig
    from dlfa.tasks import tasks_table

    print(tasks_table(parse_config(TasksConfig, given).data_dir))
    return 0


def _download_configs() -> tuple[type, ...]:
    from dlfa.configs import DownloadConfig

    return (DownloadConfig,)


def _download(given: dict[str, Any]) -> int:
    from dlfa.configs import DownloadConfig

    c = parse_config(DownloadConfig, given)
    from dlfa.data.download import download

    download(c.task, c.output, archives=c.archive or (), languages=c.languages, base_url=c.mirror,
             fused_forms=not c.syntactic_words, keep_archives=not c.remove_archives)
    return 0


def _report_configs() -> tuple[type, ...]:
    from dlfa.configs import ReportConfig

    return (ReportConfig,)


def _report(given: dict[str, Any]) -> int:
    from dlfa.configs import ReportConfig

    config = parse_config(ReportConfig, given)
    from dlfa.reporting.report import run_report

    written = run_report(config)
    print(written["table1"])
    for warning in written["warnings"]:
        print(f"dlfa: warning: {warning}", file=sys.stderr)
    print(f"{written['runs']} runs; {len(written['skipped'])} unfinished skipped; report in "
          f"{written['output']}/report.md ({written['output_reason']})")
    return 0


def _prune_configs() -> tuple[type, ...]:
    from dlfa.configs import PruneConfig

    return (PruneConfig,)


def _prune(given: dict[str, Any]) -> int:
    from dlfa.configs import PruneConfig

    config = parse_config(PruneConfig, given)
    from dlfa.reporting.prune import run_prune

    for result in run_prune(config):
        print(result.summary())
    return 0


def _similarity_configs() -> tuple[type, ...]:
    from dlfa.configs import SimilarityConfig

    return (SimilarityConfig,)


def _similarity(given: dict[str, Any]) -> int:
    from dlfa.configs import SimilarityConfig

    c = parse_config(SimilarityConfig, given)
    from dlfa.analysis.similarity import run_similarity, summary_markdown
    from dlfa.options import command_line

    result = run_similarity(c.model, c.task, c.data_dir, c.languages, c.output, split=c.split,
                            max_sentences=c.max_sentences, batch_size=c.batch_size, max_length=c.max_length,
                            device="cpu" if c.cpu else None, command=command_line())
    print(summary_markdown(result))
    print(f"{result.sentences} sentences per language, {result.seconds:.1f} s; written to {c.output}/")
    return 0


def _ablate_configs() -> tuple[type, ...]:
    from dlfa.configs import AblateConfig, RunControl

    return AblateConfig, RunControl


def _ablate(given: dict[str, Any]) -> int:
    from dlfa.configs import AblateConfig, RunControl
    from dlfa.options import command_line

    control = parse_config(RunControl, given)
    config = parse_config(AblateConfig, _split(given, AblateConfig), file=control.config)
    from dlfa.analysis.ablate import run_ablation

    result = run_ablation(config.train_config(), config.reinit_layers, config.output_dir, overwrite=control.overwrite,
                          resume=control.resume, command=command_line())
    print(result["markdown"])
    return 0


def _rank_configs() -> tuple[type, ...]:
    from dlfa.configs import RankLayersConfig

    return (RankLayersConfig,)


def _rank_layers(given: dict[str, Any]) -> int:
    from dlfa.configs import RankLayersConfig
    from dlfa.options import command_line

    config = parse_config(RankLayersConfig, given)
    from dlfa.analysis.rank_layers import ranking_markdown, run_rank_layers

    print(ranking_markdown(run_rank_layers(config, command=command_line())))
    return 0


def _convert_configs() -> tuple[type, ...]:
    from dlfa.configs import ConvertConfig

    return (ConvertConfig,)


def _convert(given: dict[str, Any]) -> int:
    from dlfa.configs import ConvertConfig

    config = parse_config(ConvertConfig, given)
    from dlfa.modeling import convert_legacy_folder

    print(convert_legacy_folder(config.source, config.output))
    return 0


_RESUME = "to continue, run the same command with --resume"
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("train", "fine-tune on English, select on English dev, score every target language zero-shot",
            _train_configs, _train, resume_hint=_RESUME),
    Command("evaluate", "score a trained run (or a saved model) on target languages", _evaluate_configs, _evaluate),
    Command("demo", "baseline against DLFA on the shipped POS sample, with the embedded model (about 5 minutes)",
            _demo_configs, _demo),
    Command("sweep", "tasks x {baseline, D_1..D_(N-1)} x seeds; resumable, local or on Ray", _sweep_configs, _sweep,
            resume_hint="to continue, run the same command again: finished cells are skipped, stopped ones resume"),
    Command("tasks", "list the tasks, their metrics and languages", _tasks_configs, _tasks),
    Command("download", "fetch a task's official release, verify it, convert it for dlfa", _download_configs,
            _download),
    Command("report", "tables (Markdown, CSV, LaTeX) and figures from finished runs, over seeds", _report_configs,
            _report),
    Command("prune", "delete the model weights of finished runs, keeping what dlfa report reads", _prune_configs,
            _prune),
    Command("analyze similarity", "cosine and linear CKA between English and each language, per layer",
            _similarity_configs, _similarity),
    Command("rank-layers", "rank every fused layer x on English data at a fraction of a sweep's cost "
            "(docs/rank-layers.md)", _rank_configs, _rank_layers),
    Command("analyze ablate", "re-initialise encoder blocks before fine-tuning; compare the transfer gap",
            _ablate_configs, _ablate, resume_hint=_RESUME),
    Command("convert", "upgrade a model folder written by dlfa 0.1 to a Hugging Face model folder", _convert_configs,
            _convert),
)}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: dlfa COMMAND [options]   (dlfa COMMAND --help: its options)", "",
             "Zero-shot cross-lingual transfer with DLFA feature aggregation.", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items()]
    return "\n".join(lines)


def _find_command(argv: Sequence[str]) -> tuple[Command, list[str]]:
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return COMMANDS[name], list(argv[words:])
    if argv and argv[0] == "analyze":
        kinds = ", ".join(n.split()[1] for n in COMMANDS if n.startswith("analyze "))
        raise DlfaInputError(f"dlfa analyze: choose one of {kinds}")
    known = ", ".join(COMMANDS)
    raise DlfaInputError(f"dlfa: unknown command {argv[0]!r} (known: {known}; dlfa --help)" if argv
                         else f"dlfa: give a command ({known}; dlfa --help)")


@functools.cache
def _parser(name: str):
    from dlfa.options import build_parser

    command = COMMANDS[name]
    return build_parser(f"dlfa {command.name}", command.configs(), command.exclude, description=command.help)


def parse(argv: Sequence[str]) -> tuple[Command, dict[str, Any]]:
    """The command and the options given on the command line (only those given)."""
    command, rest = _find_command(argv)
    return command, vars(_parser(command.name).parse_args(rest))


def _os_error_line(exc: OSError) -> str:
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] == "--version":
        from dlfa import __version__

        print(f"dlfa {__version__}")
        return 0
    command = None
    try:
        from dlfa.threads import configure

        configure()  # before torch loads: how its threads wait, and how many there are
        command, given = parse(argv)
        return command.handler(given)
    except DlfaInputError as exc:
        print(f"dlfa: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a permission, a full disk, a read-only file system, a symlink loop
        print(f"dlfa: error: {_os_error_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        hint = f"; {command.resume_hint}" if command is not None and command.resume_hint else ""
        print(f"dlfa: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
