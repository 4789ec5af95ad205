"""Verification: parity against the float64 reference, the dropout checks of the fused kernels,
and the offline compile checks of the Triton and CUDA kernels."""
