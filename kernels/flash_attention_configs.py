"""Launch configurations of the attention kernels: what ships per architecture, and the one the
interpreter runs.

On a GPU the launcher autotunes over `configs(kernel, capability, head_dim_pad)` (the shipped list
for the architecture, filtered by `keep`); under TRITON_INTERPRET=1 it runs `INTERPRETER_CONFIGS`
only, since the interpreter measures nothing. `fastgpt check` (fastgpt/gpu_check.py) compiles every
shipped config for sm_80 and sm_90 and fails on any register spill or shared-memory overflow, so a
config belongs here only if it passes there.

Block names follow the kernels: BLOCK_M counts queries, BLOCK_N keys, in every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}

    def __str__(self) -> str:
        return f"M{self.block_m}/N{self.block_n}/w{self.num_warps}/s{self.num_stages}"


C = KernelConfig

# The interpreter runs programs one after another in numpy: few large blocks are fastest, and the
# unequal block sizes exercise the diagonal logic that equal blocks would hide.
INTERPRETER_CONFIGS: dict[str, KernelConfig] = {
    "fwd": C(64, 32, 4, 1),
    "bwd_dkdv": C(32, 64, 4, 1),
    "bwd_dq": C(64, 32, 4, 1),
}
PREPROCESS_BLOCK_M = 64  # Δ = rowsum(dO∘out): memory-bound, one config everywhere

# Candidates per (kernel, compute capability major·10) for the autotuner; the head dims each one
# may serve are narrowed by `keep`.
SHIPPED: dict[str, dict[int, list[KernelConfig]]] = {
    "fwd": {
        80: [C(64, 64, 4, 3), C(128, 64, 8, 3), C(128, 32, 4, 3), C(64, 32, 4, 4)],
        90: [C(64, 64, 4, 3), C(128, 64, 8, 3), C(128, 128, 8, 3), C(128, 64, 4, 3)],
    },
    "bwd_dkdv": {
        80: [C(32, 64, 4, 2), C(32, 128, 8, 2), C(64, 64, 4, 2)],
        90: [C(32, 64, 4, 2), C(32, 128, 8, 2), C(64, 128, 8, 2)],
    },
    "bwd_dq": {
        80: [C(64, 32, 4, 2), C(128, 32, 8, 2), C(64, 64, 4, 2)],
        90: [C(64, 32, 4, 2), C(128, 32, 8, 2), C(128, 64, 8, 2)],
    },
}

# The largest BLOCK_M·BLOCK_N per head dim above which a kernel holds too many live fp32 tiles.
_MAX_TILE = {16: 128 * 128, 32: 128 * 128, 64: 128 * 128, 128: 128 * 64}


def keep(kernel: str, config: KernelConfig, head_dim_pad: int) -> bool:
    """Whether `config` is valid for `kernel` at this (power-of-two) head dim.

    The forward and dQ kernels step key blocks inside a query block's diagonal, so BLOCK_M must be
    a multiple of BLOCK_N; dK/dV steps query blocks inside a key block, the other way round.
    """
    if min(config.block_m, config.block_n) < 16:  # tl.dot's smallest tile
        return False
    if kernel in ("fwd", "bwd_dq") and config.block_m % config.block_n:
        return False
    if kernel == "bwd_dkdv" and config.block_n % config.block_m:
        return False
    return config.block_m * config.block_n <= _MAX_TILE[head_dim_pad]


def arch_of(capability: tuple[int, int]) -> int:
    """The shipped list an architecture uses: sm_8x -> 80, sm_90 and newer -> 90."""
    major = capability[0]
    if major < 8:
        raise ValueError(f"compute capability {major}.{capability[1]} is below the 8.0 (Ampere) the kernels target")
    return 80 if major == 8 else 90


def configs(kernel: str, capability: tuple[int, int], head_dim_pad: int) -> list[KernelConfig]:
    """The autotuner's candidates for `kernel` on a GPU of this compute capability."""
    return [c for c in SHIPPED[kernel][arch_of(capability)] if keep(kernel, c, head_dim_pad)]
