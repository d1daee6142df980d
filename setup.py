"""Only for the optional C accelerators of the hot path: the decoder's (decoder/_cdecode.c) and
the batch fold's (sink/_cfold.c), which share decoder/_tupledata.h.

Everything else is in pyproject.toml. `optional=True`: without a C compiler or Python headers the
install still succeeds and pgferry uses the pure-Python parser (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("decoder._cdecode", ["decoder/_cdecode.c"], depends=["decoder/_tupledata.h"], optional=True,
              extra_compile_args=["-O2"]),
    Extension("sink._cfold", ["sink/_cfold.c"], include_dirs=["decoder"], depends=["decoder/_tupledata.h"],
              optional=True, extra_compile_args=["-O2"]),
])
