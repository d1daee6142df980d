"""Only for the optional C accelerators: the decoder's (decoder/_cdecode.c) and the batch fold's
(sink/_cfold.c), which share decoder/_tupledata.h, and the initial copy's pump (replicator/sync/_cpump.c,
which needs no libpq headers: it is handed psycopg2's libpq at run time, see replicator/sync/libpq.py).

Everything else is in pyproject.toml. `optional=True`: without a C compiler or Python headers the
install still succeeds and pgferry uses the pure-Python parser and psql for the copy (same
results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("decoder._cdecode", ["decoder/_cdecode.c"], depends=["decoder/_tupledata.h"], optional=True,
              extra_compile_args=["-O2"]),
    Extension("sink._cfold", ["sink/_cfold.c"], include_dirs=["decoder"], depends=["decoder/_tupledata.h"],
              optional=True, extra_compile_args=["-O2"]),
    Extension("replicator.sync._cpump", ["replicator/sync/_cpump.c"], depends=["replicator/sync/_libpq.h"],
              optional=True, extra_compile_args=["-O2"]),
])
