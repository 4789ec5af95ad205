"""Benchmarks of fastgpt's backends against eager PyTorch, installed as `fastgpt.benchmarks`.

`fastgpt bench attention` / `fastgpt bench train` run them; `pytest benchmarks/ --benchmark-only`
runs the pytest-benchmark suite (never part of the CI tests).
"""
