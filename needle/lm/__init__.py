"""The `needle-lm` command line (also `python -m needle.lm`): train, evaluate and sample language models.

Thin over needle.models.LanguageModel and needle.training; `needle.lm.__main__.main(argv)` is the entry point.
"""
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import CLIError

__all__ = ["CLIError", "Checkpoint", "load_checkpoint", "save_checkpoint"]
