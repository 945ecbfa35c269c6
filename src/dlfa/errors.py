"""User-facing errors.

Every problem caused by the user's input (a data file, an option, a model folder) is raised as a
:class:`DlfaInputError`. The CLI turns it into one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class DlfaInputError(Exception):
    """Bad input: names where (file and line, or an option) and what is wrong."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 option: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.option = option
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
            return f"{where}: {self.message}"
        if self.option is not None:
            return f"option {self.option}: {self.message}"
        return self.message
