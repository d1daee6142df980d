"""A TCP proxy for fault tests: put it between pgferry and a server, then cut or black-hole it."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards every connection to `upstream`.

    * ``cut()``: reset every open connection (as a network failure or a killed peer would);
      new connections still go through.
    * ``blackhole(True)``: stop forwarding in both directions without closing anything, like a
      dropped route: the peers see silence, not an error. ``blackhole(False)`` resumes.
    * ``limit(bytes_per_second)``: forward at most that many bytes a second (all connections and
      both directions together), like a slow link: a copy through it runs at a steady rate.
      ``limit(None)`` lifts it.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._holes = False
        self._closed = False
        self._rate: float | None = None
        self._next = 0.0  # when the bytes forwarded so far may have gone, at the limit
        self.connections_made = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def dsn_for(self, dsn: str) -> str:
        """The same libpq DSN, pointed at the proxy."""
        parts = [p for p in dsn.split() if not p.startswith(("host=", "port="))]
        return " ".join([f"host=127.0.0.1 port={self.port}", *parts])

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._closed:  # accepted by an accept() that was blocked while close() ran
                _reset(client)
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append((client, server))
                self.connections_made += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while True:
                if self._holes:
                    select.select([], [], [], 0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for s in readable:
                    data = s.recv(16384 if self._rate else 65536)
                    if not data:
                        return
                    self._wait_for_budget(len(data))
                    peer[s].sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut() closed
            return
        finally:
            for s in (a, b):
                _reset(s)
            with self._lock:
                if (a, b) in self._conns:
                    self._conns.remove((a, b))

    def cut(self) -> int:
        """Reset all open connections; returns how many were cut."""
        with self._lock:
            conns, self._conns = self._conns, []
        for a, b in conns:
            _reset(a)
            _reset(b)
        return len(conns)

    def blackhole(self, on: bool) -> None:
        self._holes = on

    def limit(self, bytes_per_second: float | None) -> None:
        self._rate = bytes_per_second

    def _wait_for_budget(self, n: int) -> None:
        rate = self._rate
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / rate
            until = self._next
        time.sleep(max(0.0, until - now))

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        """Stop listening (new connections are refused) and reset the open ones."""
        self._closed = True
        try:  # wakes an accept() blocked in another thread; close() alone leaves the port listening
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.cut()


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    except OSError:
        pass
