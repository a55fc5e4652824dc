"""How the CLI reports: CLIError for bad input (one line, exit status 2) and one-line notes on stderr."""
import sys

from .. import distributed

__all__ = ["CLIError", "warn", "note"]


class CLIError(Exception):
    """Bad input from the user; `main` prints the message as one line on stderr and exits with status 2."""


def warn(message):
    if distributed.is_main():  # under mpirun, rank 0 speaks for all
        print(f"needle-lm: warning: {message}", file=sys.stderr)


def note(message):
    if distributed.is_main():
        print(f"needle-lm: {message}", file=sys.stderr)
