"""Benchmark and evaluation harnesses (``python -m benchmarks.bench`` etc. from the repository root).

Not part of the installed package (``pyproject.toml`` installs ``pipeline*`` and ``jobs*`` only):
these scripts drive the library from outside, like a user would, and write their results under
``benchmarks/results/``.
"""
