"""Triton kernels, installed as `fastgpt.kernels` (never as a bare `kernels`)."""
