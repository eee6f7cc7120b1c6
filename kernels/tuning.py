"""Launch configurations: which path and block shapes for a given (bits, M, N, K).

The numbers come from ``python -m pipeline.evaluate.bench_kernels --sweep`` on the lent H100
(BENCHMARKS.md, benchmarks/kernels/NOTES.md). Split-K is chosen from the SM count so that a
skinny launch fills the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# GEMV (CUDA cores) serves M <= GEMV_MAX_M; above it the tensor-core kernel is faster because a
# GEMV pays one FMA per weight per row of x.
GEMV_MAX_M = 2
# from this M on, dequantize once to 16 bits and let cuBLAS do the (compute-bound) product
DEQUANT_MIN_M = 1 << 30


@dataclass(frozen=True)
class GemvConfig:
    BN: int = 128
    R: int = 16  # decode rows (words, or 3-word chunks) per iteration
    num_warps: int = 4
    split: int | None = None  # k-splits; None: from the SM count
    evict: int = 1  # 1: evict-first word loads; 2 (fp16-pair kernels): non-coherent, no L1 allocation, the L2
    # asked for whole 256 B blocks (run 12: W4 M=1 2-3% faster); elsewhere 2 acts as 1
    waves: float = 8.0  # target programs per SM when choosing split
    maxnreg: int | None = None  # register cap: W4 R16 fits 128 without spills (4 programs/SM, not 3)
    h2: bool | None = None  # fp16-pair kernel (gemv_h2.py); None: wherever it applies (W4/W3, fp16 x)
    asm: bool = True  # h2 with inline PTX (False: its portable twin, also what the interpreter runs)
    depth: int = 1  # h2: iterations loaded ahead (1 or 2; 2 doubles the bytes in flight and the registers)
    stream_k: bool = False  # h2: waves x SMs programs share the (tile, iteration) units evenly (one wave)
    x_ahead: bool = True  # h2: x loaded an iteration ahead with the words (False: where used; fewer registers)

    def rows_ok(self, rows_per_128k: int, k_rows: int | None = None) -> "GemvConfig":
        """R must divide the rows of one 128-k block (the padding unit); given ``k_rows`` (the real
        decode rows; fp16-pair GEMV only), R may also be a multiple of it that divides ``k_rows``."""
        r = self.R
        if k_rows is not None and r > rows_per_128k and r % rows_per_128k == 0 and k_rows % r == 0:
            return self
        while rows_per_128k % r:
            r //= 2
        return self if r == self.R else replace(self, R=max(r, 1))


@dataclass(frozen=True)
class GemmConfig:
    BM: int = 64
    BN: int = 128
    BK: int = 64
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8
    split: int | None = None  # None: split-K only when the tiles do not fill the GPU
    evict: int = 0  # as GemvConfig.evict (0: plain loads)
    waves: float = 2.0
    trans: bool = False  # weights as the MMA's A operand (from registers): for small M
    h2: bool = False  # fp16-pair decode in fragment order (gemm_h2.py; weights as the A operand, BK 128)
    maxnreg: int | None = None  # register cap per thread (fp16-pair GEMM)
    perm: bool = False  # fp16-pair GEMM, BN128 with 4 warps, no GLU: tile rows in a column order that lets
    # each thread load its four words of a k-row at once (gemm_h2._columns; run 13)
    scale_after: bool | None = None  # fp16-pair GEMM, one group per k-block: the group's scale multiplies the
    # block's fp32 partial sums (a second [BN, BM] accumulator) instead of the tile's fp16 pairs; None: for
    # BM <= 16 (run 13: at BM 64 the second accumulator took 255 registers and spilled, 178 without it)


def gemv_config(bits: int, m: int, n: int, k: int) -> GemvConfig:
    """Defaults when the autotuner is off (CPU, VLMQ_AUTOTUNE=0). Run 1 on the H100, 8192->28672:
    W4 R16 59 µs < R8 60 < R4 67; W3 R4 52 < R2 53; BN=256 slower (fewer programs per SM)."""
    if bits == 3:
        return GemvConfig(BN=128, R=4, num_warps=4)
    return GemvConfig(BN=128, R=16, num_warps=4, maxnreg=128)


def gemv_h2_config(bits: int, k: int | None = None) -> GemvConfig:
    """fp16-pair GEMV default (autotuner off). Run 4 sweep on the H100, 8192->28672, M=1:
    W4 BN64 R16 46.5 µs (BN128 R8 x16 52.7); W3 BN64 R4 39.8 µs (BN128 R2 40.4). Run 12: the W4
    weight loads with the L2 256 B fetch hint 45.7 / 45.4 µs vs 47.0 / 46.5 (8192->28672 / 28672->8192);
    W3 unchanged by it. Run 13: iterations over four groups (BN32, R16 / R32) where they divide ``k``:
    W3 33.9 µs, W4 43.6 on 8192->28672 (``k`` None: BN64, e.g. for a gate/up GLU epilogue)."""
    wide = 16 if bits == 3 else 32
    if k is not None and k % (wide * (32 if bits == 3 else 8)) == 0:
        return GemvConfig(BN=32, R=wide, num_warps=4, waves=6.0, h2=True, evict=1 if bits == 3 else 2,
                          x_ahead=bits == 4)
    return GemvConfig(BN=64, R=4 if bits == 3 else 16, num_warps=4, waves=8.0, h2=True, evict=1 if bits == 3 else 2)


def gemm_h2_config(m: int, tile: int, bits: int = 4, glu: int = 0) -> GemmConfig:
    """fp16-pair tensor-core GEMM default (autotuner off). Run 9-10 sweeps on the H100: BN128 x4 capped
    at 128 registers best on every shape at M=4 and 16 (8192 -> 28672 W4 M=16: 57.6 µs vs 68 for BN64 x6)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    if tile % 128:
        return GemmConfig(BM=bm, BN=64, h2=True, waves=6.0)
    # run 12: the L2 256 B fetch hint on the words, 0.4-0.8 µs faster in 6 of 6 (shape, bits) at M=16;
    # run 14: W4 words in the 8-byte-load column order (perm), 0.6-1.9 µs faster on 8192 -> 28672 and
    # 28672 -> 8192 at M=4 and 16, tied on 3584 -> 18944 (W3: 0.7-1.1 µs slower, so not for W3)
    perm = bits == 4 and bm == 16 and not glu
    return GemmConfig(BM=bm, BN=128, h2=True, waves=4.0, maxnreg=128, evict=2, perm=perm)


def gemm_config(bits: int, m: int, n: int, k: int) -> GemmConfig:
    bk = 64 if bits == 3 else 128
    if m <= 16:  # run 1: BN64 97 µs < BN128 131 µs at M=16 (more programs in flight)
        return GemmConfig(BM=16, BN=64, BK=bk, num_warps=4, num_stages=3, evict=True, waves=4.0, trans=True)
    if m <= 64:
        return GemmConfig(BM=64, BN=64, BK=bk, num_warps=4, num_stages=3, evict=True, waves=4.0, trans=True)
    if m <= 256:
        return GemmConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
    return GemmConfig(BM=256, BN=128, BK=64, num_warps=8, num_stages=3)  # run 1: best at M=2048
