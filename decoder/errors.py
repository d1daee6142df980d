"""The decoder's one exception type."""

from __future__ import annotations


class DecodeError(ValueError):
    """Bytes that are not a valid pgoutput / replication message.

    Carries what a bug report needs: the message tag, the offset in the message where decoding
    failed, and (for a short buffer) how many bytes were needed and how many were present.
    """

    def __init__(self, reason: str, *, tag: str | None = None, offset: int | None = None,
                 needed: int | None = None, present: int | None = None) -> None:
        self.reason = reason
        self.tag = tag
        self.offset = offset
        self.needed = needed
        self.present = present
        parts = [reason]
        if tag is not None:
            parts.append(f"tag {tag!r}")
        if offset is not None:
            parts.append(f"offset {offset}")
        if needed is not None:
            parts.append(f"needed {needed} bytes, {present} present")
        super().__init__("; ".join(parts))


def short(tag: str, offset: int, needed: int, present: int, what: str) -> DecodeError:
    return DecodeError(f"message truncated while reading {what}", tag=tag, offset=offset, needed=needed,
                       present=max(present, 0))
