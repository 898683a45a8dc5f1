"""The one error wrapper of every command: a bad input is one line naming the command, and exit status 2."""
from __future__ import annotations

import sys


def reported(command: str, action) -> int:
    """Run action(); a ValueError (DataError, JudgeError, ...), OSError or ImportError is one line on stderr
    naming the command, and exit status 2."""
    try:
        action()
    except (ValueError, OSError, ImportError) as error:
        print(f"prefuse {command}: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    return 0
