"""What every command shares: its exit codes, its own error, and the name it runs by.

Example:
    >>> error_line(CommandError("--llm-url and --model go together"))
    '--llm-url and --model go together'
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import ValidationError

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
"""0: done and every check held; 1: done, but a run or an invariant failed; 2: refused."""
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class CommandError(Exception):
    """A mistake in the command's arguments, found by the command itself."""


def command_name() -> str:
    """How the user started us: `sleeptime` when installed, else `python run.py`."""
    return "sleeptime" if Path(sys.argv[0]).name == "sleeptime" else "python run.py"


def error_line(error: Exception) -> str:
    """One line saying what went wrong; pydantic's errors are folded to `field: problem`."""
    if isinstance(error, ValidationError):
        problems = [
            f"{'.'.join(str(part) for part in problem['loc']) or 'input'}: {problem['msg']}"
            for problem in error.errors()
        ]
        return "invalid input: " + "; ".join(problems)
    return " ".join(str(error).split()) or type(error).__name__
