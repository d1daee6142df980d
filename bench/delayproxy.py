"""A TCP proxy that delays every byte by a fixed time each way: a network link with latency.

    proxy = DelayProxy("127.0.0.1", 5432, delay_ms=1.0)   # 1 ms each way: 2 ms round trip
    dsn = proxy.dsn_for(server_dsn)

Each direction of each connection has a reader that stamps what it receives and a writer that
sends it once its time has come, so the delay does not cap the bandwidth (a busy stream is not
slowed by more than the delay). The bench puts one between pgferry and the target, and one between
native apply's worker (on the target) and the source: each consumer gets the same link to the
server it is remote from.
"""

from __future__ import annotations

import collections
import socket
import threading
import time


class DelayProxy:
    def __init__(self, host: str, port: int, delay_ms: float) -> None:
        self.upstream = (host, port)
        self.delay = delay_ms / 1000
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="delay-accept").start()

    def dsn_for(self, dsn: str) -> str:
        parts = [p for p in dsn.split() if not p.startswith(("host=", "port="))]
        return " ".join([f"host=127.0.0.1 port={self.port}", *parts])

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                pending: collections.deque[tuple[float, bytes]] = collections.deque()
                ready = threading.Condition()
                threading.Thread(target=self._read, args=(a, pending, ready), daemon=True).start()
                threading.Thread(target=self._write, args=(b, pending, ready), daemon=True).start()

    def _read(self, a: socket.socket, pending: collections.deque, ready: threading.Condition) -> None:
        while True:
            try:
                data = a.recv(1 << 16)
            except OSError:
                data = b""
            with ready:
                pending.append((time.monotonic() + self.delay, data))
                ready.notify()
            if not data:
                return

    def _write(self, b: socket.socket, pending: collections.deque, ready: threading.Condition) -> None:
        while True:
            with ready:
                while not pending:
                    ready.wait()
                due, data = pending.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                b.sendall(data)
            except OSError:
                return
