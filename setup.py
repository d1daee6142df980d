"""Only for the optional C accelerator of the decoder hot path (decoder/_cdecode.c).

Everything else is in pyproject.toml. `optional=True`: without a C compiler or Python headers the
install still succeeds and pgferry uses the pure-Python parser (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("decoder._cdecode", ["decoder/_cdecode.c"], optional=True,
                             extra_compile_args=["-O2"])])
