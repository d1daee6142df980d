"""pgferry's CPU priority: below the database servers' by default (`nice`, default 10).

On a host that pgferry shares with the source or the target, it competes for CPU with the
walsender that feeds it and the backend that applies its batches. Both are on pgferry's own
critical path, and the walsender is the first ceiling of a catch-up: giving the servers the CPU
first made the catch-up faster, not slower (bench/README.md, "pgferry's CPU priority"). The
source's other clients win over pgferry too, which is what a migration running beside a
production database should do. On a host of its own, the value changes nothing.

Linux keeps a nice value per thread (set here for every thread of the process; threads started
later inherit it) and, with `kernel.sched_autogroup_enabled`, shares the CPU between sessions
first: there a process's nice only counts against the processes of its own session, and each
PostgreSQL backend is a session of its own. So when pgferry leads its session (a service, `setsid`)
the session's autogroup nice is lowered too. Started from a shell, pgferry
shares the shell's session and leaves its autogroup alone: it is not pgferry's to change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

AUTOGROUP = Path("/proc/self/autogroup")


def lower_priority(nice: int) -> None:
    """Raise this process's nice value to `nice` (never lower it: 0 leaves it as it is)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tasks = Path("/proc/self/task")
    tids = [int(t) for t in os.listdir(tasks)] if tasks.is_dir() else [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as e:  # a thread that just ended; or a platform that refuses
            log.debug("could not set thread %s's nice value: %s", tid, e)
    if os.getsid(0) != os.getpid():
        return
    try:
        current = int(AUTOGROUP.read_text().split()[-1])  # "/autogroup-123 nice 0"
        if current < nice:
            AUTOGROUP.write_text(str(nice))
    except (OSError, ValueError, IndexError) as e:  # no autogroups (not Linux, or configured out)
        log.debug("could not set the session's autogroup nice value: %s", e)
