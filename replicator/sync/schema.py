"""The source's schema, dumped once in the copy's snapshot and restored in sections."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

from ..errors import SyncError
from ..source import describe_dsn
from .pgtools import find_client, find_pg_dump, libpq_env


class SchemaDump:
    """The source's schema, dumped once in the snapshot (pg_dump's custom format, kept in memory),
    and its sections as SQL a plain connection can run, from pg_restore: pre-data before the copy,
    post-data as the tables are copied. One dump instead of one per section: the source's catalog
    is read once (pg_dump costs about the same whatever the sections: 36 ms each here on pgbench;
    seconds on thousands of tables), and no pg_dump runs beside the copy. pg_dump starts at once
    and runs in the background (the tables are registered meanwhile); its failure is raised by the
    first `section`."""

    def __init__(self, dsn: str, snapshot: str | None, own_schema: str | None = None) -> None:
        """`own_schema`: pgferry's schema on the source (the schema-change capture), left out with
        its event triggers."""
        self.dsn = dsn
        self._toc: str | None = None
        # --encoding: the dump is in the database's encoding otherwise (a LATIN1 source's é is not UTF-8)
        cmd = [find_pg_dump(), "--schema-only", "--format=custom", "--no-publications", "--no-subscriptions",
               "--no-comments", "--encoding=UTF8"]
        if snapshot:
            cmd.insert(1, f"--snapshot={snapshot}")
        if own_schema:
            cmd.append(f"--exclude-schema={own_schema}")
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg_dump")
        self._dump = pool.submit(subprocess.run, cmd, capture_output=True, check=False, env=libpq_env(dsn))
        pool.shutdown(wait=False)  # its thread ends with pg_dump

    @functools.cached_property
    def archive(self) -> bytes:
        """The dump (waits for pg_dump)."""
        res = self._dump.result()
        if res.returncode != 0:
            raise SyncError(f"pg_dump --schema-only of source {describe_dsn(self.dsn)} failed: {_last_line(res)}")
        return res.stdout

    def _listing(self, section: str) -> str:
        """The archive's table of contents without pgferry's event triggers (its capture's)."""
        from ..ddl.capture import DROP_TRIGGER, TRIGGER

        if self._toc is None:
            with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".dump") as f:
                f.write(self.archive)
            try:
                res = subprocess.run([find_client("pg_restore"), "--list", f.name], capture_output=True, check=False)
            finally:
                os.unlink(f.name)
            if res.returncode != 0:
                raise SyncError(f"pg_restore --section={section} of the schema dumped from source "
                                f"{describe_dsn(self.dsn)} failed (listing it): {_last_line(res)}")
            own = (f"EVENT TRIGGER - {TRIGGER} ", f"EVENT TRIGGER - {DROP_TRIGGER} ")
            lines = [line for line in res.stdout.decode().splitlines() if not any(o in line + " " for o in own)]
            self._toc = "\n".join(lines) + "\n"
        return self._toc

    def section(self, name: str) -> str:
        with tempfile.NamedTemporaryFile("w", suffix=".list") as listing:
            listing.write(self._listing(name))
            listing.flush()
            res = subprocess.run([find_client("pg_restore"), f"--section={name}", "--no-owner", "--no-privileges",
                                  f"--use-list={listing.name}", "--file=-"], input=self.archive, capture_output=True,
                                 check=False)
        if res.returncode != 0:
            raise SyncError(f"pg_restore --section={name} of the schema dumped from source {describe_dsn(self.dsn)} "
                            f"failed: {_last_line(res)}")
        # pg_dump 17.6+/18 bracket their output with \restrict / \unrestrict (psql-only commands).
        return "\n".join(line for line in res.stdout.decode().splitlines() if not line.startswith("\\"))


def _last_line(res: subprocess.CompletedProcess[bytes]) -> str:
    err = res.stderr.decode(errors="replace").strip()
    return err.splitlines()[-1] if err else f"exit code {res.returncode}"
