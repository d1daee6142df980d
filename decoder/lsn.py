"""The one LSN type: an unsigned 64-bit WAL position that prints as PostgreSQL does (X/XXXXXXXX)."""

from __future__ import annotations

import functools

_MAX = (1 << 64) - 1


class Lsn(int):
    """A WAL position. Compares and adds like an int; `str()` gives PostgreSQL's text form.

    Log and print Lsn values, never raw ints: `16/B374D848` can be matched against
    `pg_current_wal_lsn()`, 96431856712 cannot.
    """

    __slots__ = ()

    def __new__(cls, value: int | str = 0) -> Lsn:
        if isinstance(value, str):
            return cls.parse(value)
        if not 0 <= value <= _MAX:
            raise ValueError(f"LSN out of range (must be 0..2^64-1): {value}")
        return int.__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        hi, sep, lo = text.strip().partition("/")
        try:
            if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
                raise ValueError
            return int.__new__(cls, (int(hi, 16) << 32) | int(lo, 16))
        except ValueError:
            raise ValueError(f"not an LSN (expected X/XXXXXXXX, e.g. 0/16B3748): {text!r}") from None

    def __str__(self) -> str:
        # Exactly as the server prints pg_lsn (`%X/%X`, no padding), so a logged LSN can be
        # compared as text with pg_current_wal_lsn() or a slot's confirmed_flush_lsn.
        return f"{int(self) >> 32:X}/{int(self) & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec) if not spec or spec[-1] not in "dxXob" else int.__format__(self, spec)


INVALID_LSN = Lsn(0)

# For values decoded with '>Q' (always in range): skips Lsn.__new__'s checks on the hot path.
lsn_unchecked = functools.partial(int.__new__, Lsn)
