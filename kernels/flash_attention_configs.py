"""Launch configurations of the attention kernels: what ships per architecture, and the one the
interpreter runs.

On a GPU the launcher autotunes over `configs(kernel, capability, head_dim_pad, fp32)` (the shipped
list for the architecture, head dim and input width, filtered by `keep`); under TRITON_INTERPRET=1 it runs `INTERPRETER_CONFIGS`
only, since the interpreter measures nothing. Before timing them, the autotuner compiles the
candidates for the call at hand and drops those whose kernel spills registers there
(`drop_spilling`): spills move with the ptxas each triton bundles, so a list that holds under one
triton can spill under another. `fastgpt check` (fastgpt/verify/triton_compile.py) compiles every
shipped config for sm_80 and sm_90 with this machine's triton: a config that spills is reported as
dropped at run time, and the check fails where a call would have no spill-free config left, or on
a shared-memory overflow. The lists below are chosen so that none spills under the triton the
README pins.

Block names follow the kernels: BLOCK_M counts queries, BLOCK_N keys, in every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

Candidate = TypeVar("Candidate")

# "fwd_decode" is the forward kernel launched for few queries (T_q <= DECODE_MAX_QUERIES: a KV
# cache's decode step) with configs of its own; see the header of flash_attention.py.
KERNELS = ("fwd", "fwd_decode", "bwd_dkdv", "bwd_dq")
DECODE_MAX_QUERIES = 16
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # every D between them; padded to a power of two inside the kernels
# What `fastgpt check` compiles: every padded width, and each shipped list (64, 128, 256) also with
# padding (registers follow the padded width; padding adds the column masks). Interpreter parity
# runs the odd ones (40, 59, 111, 160, 192, 256). A D that is no multiple of 8 in 16-bit (59, 111)
# also makes the GPT's strides no multiple of 16 bytes: scalar loads and more registers, which can
# spill in the widest configs (`fastgpt check --head-dim 59` shows where): slower, still correct.
CHECKED_HEAD_DIMS = (16, 32, 48, 64, 96, 128, 160, 256)


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
        blocks = f"M{self.block_m}/N{self.block_n}" if self.block_n else f"M{self.block_m}"
        return f"{blocks}/w{self.num_warps}/s{self.num_stages}"


C = KernelConfig

# The interpreter runs programs one after another in numpy: few large blocks are fastest, and the
# unequal block sizes exercise the diagonal logic that equal blocks would hide.
INTERPRETER_CONFIGS: dict[str, KernelConfig] = {
    "fwd": C(64, 32, 4, 1),
    "fwd_decode": C(16, 64, 4, 1),
    "bwd_dkdv": C(32, 64, 4, 1),
    "bwd_dq": C(64, 32, 4, 1),
}
PREPROCESS_BLOCK_M = 64  # Δ = rowsum(dO∘out): memory-bound, one config everywhere

# The autotuner's candidates per kernel, compute capability (major·10) and head-dim class (padded
# head dim <= 64, 128 or 256). Chosen from a wider sweep by `fastgpt check`: on sm_80 the register
# file is the limit (mma.sync keeps both fp32 tiles in registers, and dropout's Philox adds ~40
# registers), so the D=128 backward needs 8 warps or thin blocks; e.g. fwd M128/N64 with 4 warps
# spills 1 KB at D=64, and dK/dV M64/N64 with 4 warps spills at every head dim. At D=256 a dK/dV
# program holds four (BLOCK_N, 256) tiles (k, v, and fp32 dK, dV): 32 keys on 8 warps is the most
# that does not spill (N64 spills 144-680 bytes, 4 warps 132-236), and the forward's fp32
# accumulator allows 64 queries on 8 warps on sm_80 (M128 spills ~600 bytes there, not on sm_90).
SHIPPED: dict[str, dict[int, dict[int, list[KernelConfig]]]] = {
    "fwd": {
        80: {64: [C(128, 64, 8, 3), C(64, 64, 4, 3)], 128: [C(128, 64, 8, 4), C(64, 32, 4, 3)],
             256: [C(64, 32, 8, 2), C(32, 64, 4, 2)]},
        90: {64: [C(128, 64, 8, 3), C(64, 128, 4, 3)], 128: [C(128, 64, 8, 3), C(64, 64, 4, 3)],
             256: [C(128, 32, 8, 2), C(64, 32, 8, 2)]},
    },
    # one 16-row query block (the smallest tl.dot tile), wide key blocks: decoding is memory-bound
    "fwd_decode": {
        80: {64: [C(16, 64, 4, 2), C(16, 128, 4, 2)], 128: [C(16, 64, 4, 2), C(16, 32, 4, 2)],
             256: [C(16, 32, 4, 2), C(16, 64, 8, 2)]},
        90: {64: [C(16, 64, 4, 2), C(16, 128, 8, 2)], 128: [C(16, 64, 4, 2), C(16, 32, 4, 2)],
             256: [C(16, 32, 4, 2), C(16, 64, 8, 2)]},
    },
    "bwd_dkdv": {
        80: {64: [C(32, 64, 4, 2), C(32, 128, 8, 2)], 128: [C(32, 64, 8, 2), C(16, 64, 8, 2)],
             256: [C(16, 32, 8, 2), C(32, 32, 8, 2)]},
        90: {64: [C(32, 128, 8, 2), C(32, 64, 4, 2)], 128: [C(32, 128, 8, 2), C(32, 64, 8, 2)],
             256: [C(16, 32, 8, 2), C(32, 32, 8, 2)]},
    },
    "bwd_dq": {
        80: {64: [C(64, 32, 4, 2), C(128, 32, 8, 2)], 128: [C(64, 32, 8, 2), C(64, 16, 4, 2)],
             256: [C(32, 32, 8, 2), C(64, 32, 8, 2)]},
        90: {64: [C(128, 32, 8, 2), C(128, 64, 8, 2)], 128: [C(128, 32, 8, 2), C(64, 32, 8, 2)],
             256: [C(64, 16, 8, 2)]},
    },
}

# fp32 inputs run full-precision dots (dot_precision below): FMA loops, not tensor cores, whose
# operands and products all live in registers. The 16-bit lists spill up to 160 KB there, so fp32
# gets thin blocks of its own. fp32 on a GPU is the exact path, not the fast one. (The T_q < T_k
# diagonal offset cost a few registers: fwd M16/N16/w4 at D=80/96 and dK/dV M16/N32/w4 with
# dropout on sm_80, dQ M64/N16/w8 at D=128 on sm_90 began to spill 8-48 bytes and were replaced by
# 8-warp configs that do not. Dropout drawing eight keys per Philox call, interleaved into the
# tile, cost a few more: fwd M32/N16/w4 and decode M16/N64/w4 at D=48 on sm_80, fwd M128/N128/w8/s3
# (16-bit) and dK/dV M16/N32/w4 on sm_90 spilled 8-24 bytes with dropout and were replaced.)
# From D=160 on, where ptxas holds a kernel at 128 registers (8 warps, often) the wide fp32 tiles
# spill 8-64 bytes: fwd M32/N16/w8, dQ M32/N16/w8 and dK/dV M16/N16/w8 on sm_80, fwd and dQ with 8
# warps on sm_90; those lists are short. (16-bit dQ M32/N32/w8 on sm_90 spills 24 bytes at D=160.)
SHIPPED_FP32: dict[str, dict[int, dict[int, list[KernelConfig]]]] = {
    "fwd": {
        80: {64: [C(32, 16, 8, 2), C(64, 32, 8, 2)], 128: [C(32, 16, 4, 2), C(16, 16, 8, 2)],
             256: [C(16, 16, 4, 2), C(16, 16, 8, 2)]},  # w4 spills 56 bytes at D=160 with dropout under triton 3.9
        90: {64: [C(32, 16, 4, 2), C(64, 32, 8, 2)], 128: [C(32, 16, 8, 2), C(16, 16, 4, 2)],
             256: [C(16, 16, 4, 2)]},
    },
    "fwd_decode": {
        80: {64: [C(16, 32, 4, 2), C(16, 64, 8, 2)], 128: [C(16, 32, 8, 2), C(16, 16, 8, 2)],
             256: [C(16, 16, 4, 2), C(16, 32, 8, 2)]},
        90: {64: [C(16, 32, 4, 2), C(16, 64, 8, 2)], 128: [C(16, 16, 4, 2), C(16, 32, 8, 2)],
             256: [C(16, 16, 4, 2), C(16, 32, 8, 2)]},
    },
    "bwd_dkdv": {
        80: {64: [C(16, 32, 8, 2), C(16, 16, 4, 2)], 128: [C(16, 16, 4, 2)], 256: [C(16, 32, 8, 2), C(16, 16, 4, 2)]},
        90: {64: [C(16, 16, 4, 2), C(16, 32, 8, 2)], 128: [C(16, 32, 8, 2), C(16, 16, 4, 2)],
             256: [C(16, 32, 8, 2)]},
    },
    "bwd_dq": {
        80: {64: [C(32, 16, 4, 2), C(32, 32, 8, 2)], 128: [C(32, 16, 4, 2)], 256: [C(16, 16, 4, 2)]},
        90: {64: [C(32, 16, 4, 2), C(32, 32, 8, 2)], 128: [C(32, 16, 4, 2), C(32, 16, 8, 2)],
             256: [C(16, 16, 4, 2), C(16, 16, 8, 2)]},
    },
}


# The grouped-query dK/dV (GROUP > 1: a loop over the group's query heads around both of its
# loops) holds a few more registers than with GROUP = 1; where a list above spills with it (sm_80
# 16-bit M32/N64 at D=64 with dropout: 112-136 bytes; sm_90 M32/N128 and M32/N64 at D=128: 40-200;
# fp32 4-warp and N32 tiles: 12-92), it gets its own: (arch, fp32 inputs, head-dim class) ->
# configs. Every other kernel and list is the same for both.
# A list of one config has nothing to fall back on where a triton's ptxas spills it: two of them
# did, and got a second config that does not spill there (with dropout: fp32 sm_80 D=128 M16/N16/s2
# 24 bytes under triton 3.6, where s3 spills none; sm_90 D=256 M16/N32 100 bytes under 3.9).
GROUPED_DKDV: dict[tuple[int, bool, int], list[KernelConfig]] = {
    (80, False, 64): [C(16, 64, 8, 2)],
    (90, False, 128): [C(32, 32, 8, 2), C(16, 64, 8, 2)],
    (80, True, 64): [C(16, 16, 8, 2)],
    (80, True, 128): [C(16, 16, 8, 2), C(16, 16, 8, 3)],
    (80, True, 256): [C(16, 16, 8, 2)],
    (90, True, 128): [C(16, 16, 8, 3)],  # at D=96 with dropout it spills 12 bytes (ptxas holds it at 128 regs)
    (90, True, 256): [C(16, 32, 8, 2), C(32, 16, 8, 2)],
}


# The banded dK/dV (causal=False or a window: three copies of the query loop, the band's bounds
# live across them) holds more registers than the causal one; where a list above spills with it
# (sm_80 16-bit D=64: M32/N64/w4 12-24 bytes, M32/N128/w8 12-92, with and without dropout), it gets
# its own: (arch, fp32 inputs, head-dim class) -> configs. The other kernels' lists keep, at worst,
# one spill-free config per banded call (`fastgpt check` names the ones dropped).
BANDED_DKDV: dict[tuple[int, bool, int], list[KernelConfig]] = {
    (80, False, 64): [C(32, 64, 8, 2), C(16, 64, 8, 2)],
}


def keep(kernel: str, config: KernelConfig) -> bool:
    """Whether `config` is a launch worth making of `kernel` (one of KERNELS): blocks of at least
    tl.dot's smallest tile (16), and for "fwd_decode" a query block of DECODE_MAX_QUERIES rows,
    which holds every query of a decode call; a taller one would add rows of padding only.

    Any ratio of BLOCK_M to BLOCK_N works: each kernel starts its diagonal band at the block
    boundary at or before the diagonal (for every offset T_k - T_q), not on the diagonal itself.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is unknown; choose one of: {', '.join(KERNELS)}")
    if min(config.block_m, config.block_n) < 16:
        return False
    return kernel != "fwd_decode" or config.block_m == DECODE_MAX_QUERIES


def padded_head_dim(head_dim: int) -> int:
    """The tile width a head dim runs at: the next power of two (tl.arange's lengths are powers of two)."""
    return 1 << (head_dim - 1).bit_length()


def head_dim_class(head_dim_pad: int) -> int:
    """Which shipped list a padded head dim uses: 64 (16-64), 128 or 256."""
    return 64 if head_dim_pad <= 64 else head_dim_pad


def dot_precision(fp32_inputs: bool) -> str:
    """tl.dot's input_precision: fp32 inputs get full-precision dots, not TF32, so fp32 results are
    as tight on a GPU as in the interpreter; fp16/bf16 dots ignore the setting."""
    return "ieee" if fp32_inputs else "tf32"


def arch_of(capability: tuple[int, int]) -> int:
    """The shipped list an architecture uses: sm_8x -> 80, sm_90 and newer -> 90."""
    major = capability[0]
    if major < 8:
        raise ValueError(f"compute capability {major}.{capability[1]} is below the 8.0 (Ampere) the kernels target")
    return 80 if major == 8 else 90


def configs(kernel: str, capability: tuple[int, int], head_dim_pad: int, fp32: bool = False,
            grouped: bool = False, banded: bool = False) -> list[KernelConfig]:
    """The autotuner's candidates for `kernel` on a GPU of this compute capability; `grouped`: for
    a grouped-query call (fewer key/value heads than query heads); `banded`: for a call with a band
    (causal=False or a window; the grouped list first where both apply)."""
    arch, head_dims = arch_of(capability), head_dim_class(head_dim_pad)
    shipped = (SHIPPED_FP32 if fp32 else SHIPPED)[kernel][arch][head_dims]
    if grouped and kernel == "bwd_dkdv":
        shipped = GROUPED_DKDV.get((arch, fp32, head_dims), shipped)
    elif banded and kernel == "bwd_dkdv":
        shipped = BANDED_DKDV.get((arch, fp32, head_dims), shipped)
    return [c for c in shipped if keep(kernel, c)]


def drop_spilling(candidates: list[Candidate], local_bytes: Callable[[Candidate], Optional[int]],
                  ) -> tuple[list[Candidate], list[tuple[Candidate, Optional[int]]]]:
    """(kept, measured): the candidates whose compiled kernel uses no local memory (spills no
    register), in their order, and every candidate with its local memory in bytes (None: it does
    not fit at all, e.g. over the shared memory of a block). When every candidate spills, the
    least-spilling one is kept, so that a call always has a config to run."""
    measured = [(c, local_bytes(c)) for c in candidates]
    kept = [c for c, spilled in measured if spilled == 0]
    if not kept:
        kept = [min(measured, key=lambda m: float("inf") if m[1] is None else m[1])[0]]
    return kept, measured
