"""Fused ops beside attention, each behind a Registry of its own (fastgpt/attention/registry.py's
rules: named kernel paths, `auto`, refusals by name), each checked against a float64 reference.

    linear_cross_entropy    the LM head and its loss, the logits never whole (cross_entropy.py)
"""

from fastgpt.ops.cross_entropy import LINEAR_CROSS_ENTROPY, linear_cross_entropy

REGISTRIES = (LINEAR_CROSS_ENTROPY,)  # every op's registry, for `fastgpt info`

__all__ = ["LINEAR_CROSS_ENTROPY", "REGISTRIES", "linear_cross_entropy"]
