"""How the CLI reports: CLIError for bad input (one line, exit status 2), TrainingDiverged for a loss that
turned NaN or infinite (one line, exit status 3), and one-line notes on stderr."""
import sys

from .. import distributed

__all__ = ["CLIError", "TrainingDiverged", "warn", "note"]


class CLIError(Exception):
    """Bad input from the user; `main` prints the message as one line on stderr and exits with `status` (2)."""

    status = 2


class TrainingDiverged(CLIError):
    """Training stopped because the loss (or the weights) turned NaN or infinite: exit status 3."""

    status = 3


def warn(message):
    if distributed.is_main():  # under mpirun, rank 0 speaks for all
        print(f"needle-lm: warning: {message}", file=sys.stderr)


def note(message):
    if distributed.is_main():
        print(f"needle-lm: {message}", file=sys.stderr)
