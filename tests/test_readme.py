"""The README's command lines are real: every ``dlfa ...`` line in its bash blocks parses, and its options pass the
command's configuration checks (values, ranges, cross-field rules). Paths are not checked: the README's
``path/to/...`` stand for the reader's folders. The Python lines are run by test_hf_integration."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dlfa.cli.main import parse
from dlfa.options import parse_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Each ``dlfa`` command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            for part in line.split("&&"):
                words = shlex.split(part.strip().removeprefix(".venv/bin/"), comments=True)
                if words and words[0] == "dlfa" and "..." not in words:
                    commands.append(shlex.join(words[1:]))
    return commands


def test_the_readme_has_dlfa_commands():
    commands = readme_commands()
    assert len(commands) >= 15 and "demo" in commands
    assert {c.split()[0] for c in commands} >= {"demo", "train", "evaluate", "sweep", "report", "prune", "rank-layers",
                                                 "download", "analyze"}


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses_and_validates(command):
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
