"""The documented command lines are real: every ``dlfa ...`` line in the bash blocks of the README, docs/*.md and
benchmarks/README.md parses, and its options pass the command's configuration checks (values, ranges, cross-field
rules). Shell variables set in the same block (``COMMON="..."``, ``for seed in 1 2 3``) are expanded first. Paths
are not checked: ``path/to/...`` stand for the reader's folders. The README's Python lines are run by
test_hf_integration."""

from __future__ import annotations

import re
import shlex
import string
from pathlib import Path

import pytest

from dlfa.cli.main import parse
from dlfa.options import parse_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def _variables(block: str) -> dict[str, str]:
    """``NAME=value`` assignments and the first value of ``for NAME in a b c`` loops in a bash block."""
    found = {}
    for line in block.splitlines():
        if match := re.match(r"\s*([A-Za-z_]\w*)=(.*)$", line):
            found[match.group(1)] = " ".join(shlex.split(match.group(2)))
        elif match := re.match(r"\s*for ([A-Za-z_]\w*) in (\S+)", line):
            found[match.group(1)] = match.group(2)
    return found


def documented_commands(path: Path) -> list[str]:
    """Each ``dlfa`` command of a Markdown file's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        block = block.replace("\\\n", " ")
        template = string.Template(block)
        block = template.safe_substitute(_variables(block))
        for line in block.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for part in line.split("&&"):
                words = shlex.split(part.strip().removeprefix(".venv/bin/"), comments=True)
                if words and words[0] == "dlfa" and "..." not in words:
                    commands.append(shlex.join(words[1:]))
    return commands


def readme_commands() -> list[str]:
    return documented_commands(README)


def test_the_readme_has_dlfa_commands():
    commands = readme_commands()
    assert len(commands) >= 15 and "demo" in commands
    assert {c.split()[0] for c in commands} >= {"demo", "train", "evaluate", "sweep", "report", "prune", "rank-layers",
                                                 "download", "analyze"}


@pytest.mark.parametrize("command", [pytest.param(c, id=f"{p.name}: {c[:60]}") for p in DOCS
                                     for c in documented_commands(p)])
def test_documented_command_parses_and_validates(command):
    cli, given = parse(shlex.split(command))
    for config_class in cli.configs():
        names = config_class.field_names()
        mine = {k: v for k, v in given.items() if k in names}
        if config_class.__name__ == "SweepConfig":
            from dlfa.training.config import TrainOptions

            train = {k: v for k, v in given.items() if k in TrainOptions.field_names()}
            parse_config(config_class, mine, fixed={"train": train})
        elif config_class.__name__ != "TrainOptions":
            parse_config(config_class, mine)
