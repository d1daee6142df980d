"""A message hook for the tests: appends each logical decoding message to $PGFERRY_TEST_HOOK_FILE."""

from __future__ import annotations

import json
import os

from decoder import LogicalMessage


def record(msg: LogicalMessage) -> None:
    with open(os.environ["PGFERRY_TEST_HOOK_FILE"], "a") as f:
        f.write(json.dumps({"prefix": msg.prefix, "content": msg.content.decode(),
                            "transactional": msg.transactional}) + "\n")
