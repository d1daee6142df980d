"""The command line: the parser and each command (`pgferry start`, `status`, `cutover`, ...)."""

from .commands import main

__all__ = ["main"]
