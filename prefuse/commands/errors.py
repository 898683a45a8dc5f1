"""The one error wrapper of every command: a bad input is one line naming the command, and exit status 2."""
from __future__ import annotations

import sys


def reported(command: str, action) -> int:
    """Run action() and return its exit status (None counts as 0); a ValueError (DataError, JudgeError, ...),
    OSError or ImportError (an optional package missing) is one line on stderr naming the command, and exit
    status 2. `prefuse` runs every command through it (cli.main)."""
    try:
        return int(action() or 0)
    except (ValueError, OSError, ImportError) as error:
        print(f"prefuse {command}: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
