"""Named failpoints for fault tests: PGFERRY_FAILPOINT=<name> makes the daemon exit abruptly
(os._exit, like kill -9: no cleanup, no rollback sent) when it reaches that point."""

from __future__ import annotations

import os
import sys

ACTIVE = os.environ.get("PGFERRY_FAILPOINT", "")
EXIT_CODE = 99


def hit(name: str) -> None:
    if ACTIVE == name:
        print(f"pgferry: failpoint {name} reached: exiting abruptly", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)
