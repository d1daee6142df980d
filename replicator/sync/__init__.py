"""The initial sync: publication and slot with an exported snapshot, the schema (plan, schema,
holdback), the parallel copy and its C pump (copy, libpq, _cpump.c), post-data (indexes and
constraints as tables finish) and sequences. `initial.InitialSync` runs it."""

from ..errors import SyncError
from .initial import InitialSync
from .plan import SyncConfig, TableCopy
from .sequences import copy_sequences

__all__ = ["InitialSync", "SyncConfig", "SyncError", "TableCopy", "copy_sequences"]
