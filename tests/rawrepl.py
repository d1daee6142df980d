"""A minimal PostgreSQL wire-protocol client for replication connections, for capturing golden
byte streams exactly as the server sends them (psycopg2 strips the envelope and swallows
keepalives). Trust authentication only: it talks to the throwaway test servers.
"""

from __future__ import annotations

import socket
import struct
import time

from decoder import Lsn, encode_standby_status

_I32 = struct.Struct(">i")


class ProtocolError(RuntimeError):
    pass


class RawReplication:
    def __init__(self, host: str, port: int, user: str, dbname: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in {
            "user": user, "database": dbname, "replication": "database", "client_encoding": "UTF8"}.items())
        body = _I32.pack(196608) + params + b"\0"
        self.sock.sendall(_I32.pack(len(body) + 4) + body)
        self._buf = b""
        while True:
            tag, payload = self._read()
            if tag == b"R" and _I32.unpack_from(payload)[0] != 0:
                raise ProtocolError("server wants a password; the capture client supports trust auth only")
            if tag == b"E":
                raise ProtocolError(_error(payload))
            if tag == b"Z":
                break

    def _recv(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ProtocolError("server closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read(self) -> tuple[bytes, bytes]:
        head = self._recv(5)
        (ln,) = _I32.unpack_from(head, 1)
        return head[:1], self._recv(ln - 4)

    def _send(self, tag: bytes, payload: bytes) -> None:
        self.sock.sendall(tag + _I32.pack(len(payload) + 4) + payload)

    def query(self, sql: str) -> list[list[str | None]]:
        """A simple query; returns the rows of its (last) result as text."""
        self._send(b"Q", sql.encode() + b"\0")
        rows: list[list[str | None]] = []
        err = None
        while True:
            tag, payload = self._read()
            if tag == b"D":
                rows.append(_datarow(payload))
            elif tag == b"E":
                err = _error(payload)
            elif tag == b"Z":
                if err:
                    raise ProtocolError(err)
                return rows

    def stream(self, slot: str, options: dict[str, str], until: Lsn, timeout: float = 60) -> list[bytes]:
        """START_REPLICATION and return every CopyData payload until an XLogData at or past
        `until` has been received, followed by one keepalive (requested with a status update)."""
        opts = ", ".join(f'"{k}" \'{v}\'' for k, v in options.items())
        self._send(b"Q", f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({opts})\0".encode())
        tag, payload = self._read()
        if tag == b"E":
            raise ProtocolError(_error(payload))
        if tag != b"W":
            raise ProtocolError(f"expected CopyBothResponse, got {tag!r}")
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        asked_keepalive = False
        reached = False
        while True:
            if time.monotonic() > deadline:
                raise ProtocolError(f"did not reach {until} within {timeout}s")
            tag, payload = self._read()
            if tag == b"E":
                raise ProtocolError(_error(payload))
            if tag != b"d":
                continue
            out.append(payload)
            if payload[:1] == b"w":
                (start,) = struct.unpack_from(">Q", payload, 1)
                if start >= until:
                    reached = True
            if payload[:1] == b"k":
                (wal_end,) = struct.unpack_from(">Q", payload, 1)
                if asked_keepalive:
                    break
                if wal_end >= until:
                    reached = True
            if reached and not asked_keepalive:
                # No flush position: the slot does not advance, so the same WAL can be re-read with
                # other options.
                self._send(b"d", encode_standby_status(0, 0, 0, 0, reply_requested=True))
                asked_keepalive = True
        self._send(b"c", b"")
        return out

    def close(self) -> None:
        try:
            self._send(b"X", b"")
        except OSError:
            pass
        self.sock.close()


def _datarow(payload: bytes) -> list[str | None]:
    (n,) = struct.unpack_from(">h", payload, 0)
    pos = 2
    row: list[str | None] = []
    for _ in range(n):
        (ln,) = _I32.unpack_from(payload, pos)
        pos += 4
        if ln < 0:
            row.append(None)
        else:
            row.append(payload[pos:pos + ln].decode())
            pos += ln
    return row


def _error(payload: bytes) -> str:
    fields = {p[:1]: p[1:].decode(errors="replace") for p in payload.split(b"\0") if p}
    return f"{fields.get(b'S', 'ERROR')}: {fields.get(b'M', '?')} ({fields.get(b'C', '')})"
