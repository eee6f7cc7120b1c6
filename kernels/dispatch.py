"""Host side: pick GEMV or GEMM by M, size split-K, launch, and own the split-K workspace."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from .layout import MAGIC_BITS, PackedWeight
from .pdl import mode as pdl_mode
from .pdl import launch_kwargs
from .tuning import (DEQUANT_MIN_M, GEMV_MAX_M, GemmConfig, GemvConfig, gemm_config, gemm_h2_config, gemv_config,
                     gemv_h2_config)

_WS: dict[tuple[str, str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown workspaces: captured graphs may still use them


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def workspace(device: torch.device, n_floats: int, n_counters: int,
              pool: str = "split-K") -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 partial-sum buffer and int32 tile counters, shared by all layers on a device.

    The split-K epilogue leaves both zeroed again, so one buffer serves every launch in stream
    order (``pool`` keeps users with other layouts apart: the decode attention's partials). It only
    grows; growing while a CUDA graph is being captured would break the graph, so that is refused
    (run one eager call at the largest M first). An outgrown buffer is kept, not freed: a graph
    captured before the growth (say at batch 1, before an eager call at batch 8) still points at
    it, and freed memory under a replay is an illegal address or another tensor's data. Growth at
    least doubles, so the kept buffers never exceed the live one.
    """
    key = (pool, device.type, device.index)
    ws, cnt = _WS.get(key, (None, None))
    if ws is None or ws.numel() < n_floats or cnt.numel() < n_counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"kernels: {pool} workspace must grow during CUDA graph capture; "
                               "run one eager forward at the largest batch before capturing")
        if ws is not None:
            _RETIRED.append((ws, cnt))
        nf = max(n_floats, 0 if ws is None else 2 * ws.numel(), 1 << 16)
        nc = max(n_counters, 0 if cnt is None else 2 * cnt.numel(), 1 << 12)
        ws = torch.zeros(nf, dtype=torch.float32, device=device)
        cnt = torch.zeros(nc, dtype=torch.int32, device=device)
        _WS[key] = (ws, cnt)
    return ws, cnt


def dirty_workspaces(reset: bool = False) -> list[tuple[str, int, int]]:
    """(pool, nonzero counters, nonzero partial sums) of every workspace not left zeroed, the
    invariant every split-K launch must keep; ``reset`` zeroes them (one failure, not a cascade)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dirty = []
    for (pool, *_), (ws, cnt) in _WS.items():
        nz_c, nz_w = int(torch.count_nonzero(cnt)), int(torch.count_nonzero(ws))
        if nz_c or nz_w:
            dirty.append((pool, nz_c, nz_w))
            if reset:
                cnt.zero_(), ws.zero_()
    return dirty


def _evict(cfg: GemvConfig | GemmConfig, fp16_pairs: bool = False) -> int:
    """The EVICT constexpr of a launch: 0 under the interpreter; ``cfg.evict``'s 2 (the L2 256 B fetch
    hint, inline PTX) only in the fp16-pair kernels, 1 elsewhere."""
    if interpreting():
        return 0
    return int(cfg.evict) if fp16_pairs else min(int(cfg.evict), 1)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split(tiles: int, iters: int, want: int | None, sms: int, waves: float, floor: bool = False) -> tuple[int, int]:
    """(number of k-splits, iterations per split), every split non-empty. ``floor``: never more than
    ``waves`` programs per SM (GEMV: run 8's 18944->3584 rounded to 1064 programs, 8 over the 1056
    that fit, and those 8 ran as a second wave)."""
    if want is None:
        want = max(1, int(sms * waves // max(tiles, 1)) if floor else round(sms * waves / max(tiles, 1)))
    want = max(1, min(want, iters))
    per = -(-iters // want)
    return -(-iters // per), per


def _common(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor | None):
    if x.dim() != 2 or x.shape[1] != pw.in_features:
        raise ValueError(f"x must be [M, {pw.in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be float16 or bfloat16, got {x.dtype}")
    x = x.contiguous()
    m, n = x.shape[0], pw.out_features
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    zero = pw.zero if pw.zero is not None else pw.scale
    b = bias if bias is not None else pw.scale
    return x, out, zero, b


def h2_applies(x: torch.Tensor, pw: PackedWeight) -> bool:
    """The fp16-pair GEMV covers W4/W3 with fp16 activations and K a multiple of 4 (x as int64)."""
    return pw.bits in (3, 4) and x.dtype == torch.float16 and pw.in_features % 4 == 0


def _check_glu(pw: PackedWeight, glu: int) -> None:
    if glu and (glu % 32 or pw.out_features % (2 * glu)):
        raise ValueError(f"glu={glu}: needs a multiple of 32 dividing half of out_features ({pw.out_features})")


def _glu_after(y: torch.Tensor, glu: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of ``y`` (gate/up interleaved in blocks of ``glu``) by a second launch; ``y``
    itself when ``glu`` is 0."""
    if not glu:
        return y
    from .decode_ops import silu_mul

    return silu_mul(y, out=out, interleave=glu)


def gemv(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, cfg: GemvConfig | None = None, pdl: bool | None = None,
         glu: int = 0, accumulate: bool = False) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with a CUDA-core GEMV kernel (meant for M <= 4): the fp16-pair kernel
    where it applies (``cfg.h2``), else the portable fp32 one. ``pdl``: programmatic dependent
    launch of the fp16-pair kernel (None: as ``kernels.pdl.programmatic_launch`` says). ``glu``:
    W's rows are gate/up interleaved in blocks of ``glu`` (``interleave_gate_up``); returns
    ``silu(gate) * up`` (out_features / 2 wide), in the fp16-pair kernel's epilogue.
    ``accumulate``: add ``x @ W^T (+ bias)`` into ``out``, an fp32 ``[M, N]`` buffer (the decode
    step zeroes one per projection each step): the k-splits add their partial sums straight into it,
    saving the split-K epilogue's counter and read-back round trips."""
    from .gemv import gemv_kernel

    _check_glu(pw, glu)
    if accumulate:
        if out is None or out.dtype != torch.float32 or tuple(out.shape) != (x.shape[0], pw.out_features):
            raise ValueError(f"accumulate needs out: a float32 [{x.shape[0]}, {pw.out_features}] buffer")
        if glu:
            raise ValueError("accumulate and glu do not combine (silu-mul needs the finished sums)")
    if glu and out is None:
        out = torch.empty(x.shape[0], pw.out_features // 2, dtype=x.dtype, device=x.device)
    x, out, zero, b = _common(x, pw, bias, out)
    m, n = x.shape[0], pw.out_features
    plan = pw.plan
    if cfg is None:
        cfg = (gemv_h2_config(pw.bits, None if glu else pw.in_features) if h2_applies(x, pw)
               else gemv_config(pw.bits, m, n, pw.in_features))
    h2 = h2_applies(x, pw) if cfg.h2 is None else cfg.h2
    k_rows, block_rows = pw.in_features // plan.values_per_row, 128 // plan.values_per_row
    cfg = cfg.rows_ok(block_rows, k_rows if h2 and pw.in_features % plan.values_per_row == 0 else None)
    if h2 and not h2_applies(x, pw):
        raise ValueError("the fp16-pair GEMV needs 3/4-bit weights, fp16 x and in_features % 4 == 0")
    if glu and not h2:  # the portable kernel has no GLU epilogue: a second launch
        return _glu_after(gemv(x, pw, bias, cfg=replace(cfg, h2=False), pdl=pdl), glu, out)
    if accumulate and not h2:  # nor an accumulating one
        return out.add_(gemv(x, pw, bias, cfg=replace(cfg, h2=False), pdl=pdl))
    if glu and cfg.BN % (2 * glu):
        raise ValueError(f"GEMV BN={cfg.BN} must hold whole gate/up block pairs (2 x {glu})")
    if not cfg.x_ahead and cfg.depth != 1:
        raise ValueError("GemvConfig(x_ahead=False) loads only the words ahead, so it needs depth=1")
    per_channel = pw.group_size is None
    wide = h2 and cfg.R > block_rows  # R spans whole 128-k blocks and divides k_rows (rows_ok)
    r = cfg.R if per_channel or wide else min(cfg.R, pw.group_rows)  # grouped: inside one group, or whole ones
    if pw.tile % cfg.BN:
        raise ValueError(f"GEMV BN={cfg.BN} must divide the layout tile {pw.tile}")
    bm = 1 if m == 1 else 2 if m == 2 else 4
    n_tiles, m_blocks = -(-n // cfg.BN), -(-m // bm)
    k = pw.in_features
    # iterate only over rows that hold real k (the padding is all zero codes)
    iters = (-(-k // (r * plan.values_per_row)) if per_channel else k_rows // r if wide
             else k // pw.group_size * (pw.group_rows // r))
    even = m % bm == 0 and (not per_channel or k % (r * plan.values_per_row) == 0)
    split, per = _split(n_tiles * m_blocks, iters, cfg.split, sm_count(x.device), cfg.waves, floor=True)
    stream_k = h2 and cfg.stream_k
    if stream_k:  # programs = one wave; each takes `per` consecutive (tile, iteration) units
        units = n_tiles * iters
        progs = max(1, min(units, int(sm_count(x.device) * cfg.waves) // m_blocks))
        per = -(-units // progs)
        split = -(-units // per)  # the grid's first dimension
    ws, cnt = (workspace(x.device, m * n, n_tiles * m_blocks) if (split > 1 or stream_k) and not accumulate
               else (out, out))
    if h2:
        from .gemv_h2 import gemv_h2_kernel

        xq = (x if x.data_ptr() % 8 == 0 else x.clone()).view(torch.int64)
        pdl = pdl_mode(x.device) if pdl is None else pdl_mode(x.device, force=True) if pdl else 0
        gemv_h2_kernel[(split, 1, m_blocks) if stream_k else (n_tiles, split, m_blocks)](
            xq, pw.words, pw.scale, zero, b, out, ws, cnt,
            m, n, k // 4, xq.stride(0), out.stride(0), pw.rows, pw.scale.shape[1], per, iters,
            BITS=pw.bits, SYM=pw.symmetric, PER_CHANNEL=per_channel, EVEN=even,
            GROUP_ROWS=r if per_channel else pw.group_rows, T=pw.tile, BM=bm, BN=cfg.BN, R=r,
            HAS_BIAS=bias is not None, SPLIT=split > 1 or stream_k, EVICT=_evict(cfg, fp16_pairs=True),
            ASM=cfg.asm and not interpreting(), DEPTH=cfg.depth, PDL=pdl, GLU=glu, ACC=accumulate,
            STREAMK=stream_k, n_tiles=n_tiles, XAHEAD=cfg.x_ahead, num_warps=cfg.num_warps,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interpreting() else {}), **launch_kwargs(pdl),
        )
        return out
    gemv_kernel[(n_tiles, split, m_blocks)](
        x, pw.words, pw.scale, zero, b, out, ws, cnt,
        m, n, k, x.stride(0), out.stride(0), pw.rows, pw.scale.shape[1], per, iters, MAGIC_BITS,
        BITS=pw.bits, SYM=pw.symmetric, PER_CHANNEL=per_channel, EVEN=even,
        GROUP_ROWS=r if per_channel else pw.group_rows, T=pw.tile, BM=bm, BN=cfg.BN, R=r,
        HAS_BIAS=bias is not None, SPLIT=split > 1, EVICT=_evict(cfg),
        num_warps=cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interpreting() else {}),
    )
    return out


def gemm_h2_applies(x: torch.Tensor, pw: PackedWeight) -> bool:
    """The fp16-pair tensor-core GEMM (gemm_h2.py): W4/W3 with fp16 activations and fp16 scales
    (the pair decode multiplies by the scale in fp16), W3 groups of whole 32-value chunks."""
    return (pw.bits in (3, 4) and x.dtype == torch.float16 and pw.scale.dtype == torch.float16
            and (pw.group_size is None or pw.group_size % pw.plan.values_per_row == 0))


def _gemm_h2(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor | None,
             cfg: GemmConfig, accumulate: bool, glu: int) -> torch.Tensor:
    from .gemm_h2 import gemm_h2_kernel

    _check_glu(pw, glu)
    if glu and accumulate:
        raise ValueError("accumulate and glu do not combine (silu-mul needs the finished sums)")
    if glu and cfg.BN % (2 * glu):
        raise ValueError(f"fp16-pair GEMM BN={cfg.BN} must hold whole gate/up block pairs (2 x {glu})")
    if glu and out is None:
        out = torch.empty(x.shape[0], pw.out_features // 2, dtype=x.dtype, device=x.device)
    if accumulate and (out is None or out.dtype != torch.float32 or tuple(out.shape) != (x.shape[0], pw.out_features)):
        raise ValueError(f"accumulate needs out: a float32 [{x.shape[0]}, {pw.out_features}] buffer")
    x, out, zero, b = _common(x, pw, bias, out)
    if not gemm_h2_applies(x, pw):
        raise ValueError("the fp16-pair GEMM needs 3/4-bit weights, fp16 x and fp16 scales "
                         "(and W3 groups that are multiples of 32)")
    if cfg.BN % 64 or pw.tile % cfg.BN:
        raise ValueError(f"fp16-pair GEMM BN={cfg.BN} must be a multiple of 64 dividing the layout tile {pw.tile}")
    if cfg.perm and (glu or cfg.num_warps != 4):
        raise ValueError("GemmConfig(perm=True) needs 4 warps and no GLU epilogue (its gate/up blocks need the "
                         "natural column order)")
    m, n = x.shape[0], pw.out_features
    n_tiles, m_blocks = -(-n // cfg.BN), -(-m // cfg.BM)
    iters = -(-pw.in_features // 128)  # only blocks holding real k (the padding is all zero codes)
    split, per = _split(n_tiles * m_blocks, iters, cfg.split, sm_count(x.device), cfg.waves, floor=True)
    ws, cnt = workspace(x.device, m * n, n_tiles * m_blocks) if split > 1 and not accumulate else (out, out)
    gemm_h2_kernel[(n_tiles, split, m_blocks)](
        x, pw.words, pw.scale, zero, b, out, ws, cnt,
        m, n, pw.in_features, x.stride(0), out.stride(0), pw.rows, pw.scale.shape[1], per, iters,
        BITS=pw.bits, SYM=pw.symmetric, PER_CHANNEL=pw.group_size is None,
        GROUP_ROWS=pw.rows if pw.group_size is None else pw.group_rows, T=pw.tile, BM=cfg.BM, BN=cfg.BN,
        HAS_BIAS=bias is not None, SPLIT=split > 1, ACC=accumulate, GLU=glu,
        ASM=0 if interpreting() else 2 if cfg.evict == 2 else 1,  # 2: the words with the L2 256 B hint
        SCALE_AFTER=cfg.BM <= 16 if cfg.scale_after is None else cfg.scale_after, PERM=cfg.perm,
        num_warps=cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interpreting() else {}),
    )
    return out


# Run 11 (H100, Triton 3.6): the transposed GEMM with a 256x128 tile (8 warps, BK 64) and split-K gave
# NaN or wrong sums on every launch (W4 g128, W2 g64; split 1, BM 128 with split-K, the untransposed
# 256x128 tile and BK 32 were all exact; the workspace was left clean). Not isolated further (the
# epilogue is the same code for every tile size): such tiles run unsplit.
_TRANS_SPLIT_MAX = 128 * 128


def gemm_split(cfg: GemmConfig, tiles: int, iters: int, device: torch.device) -> tuple[int, int]:
    """(k-splits, iterations per split) of a gemm.py launch: split-K only when the tiles do not fill
    the GPU, and never for a transposed tile over 128 x 128 (run 11, above)."""
    want = cfg.split if cfg.split is not None else (None if tiles < sm_count(device) else 1)
    if cfg.trans and cfg.BM * cfg.BN > _TRANS_SPLIT_MAX:
        if cfg.split not in (None, 1):
            raise ValueError(f"GemmConfig(trans=True, BM={cfg.BM}, BN={cfg.BN}, split={cfg.split}): split-K sums of a "
                             f"transposed tile over {_TRANS_SPLIT_MAX} elements come out wrong on sm_90 (run 11); "
                             "use split=1 or BM*BN <= 16384")
        want = 1
    return _split(tiles, iters, want, sm_count(device), cfg.waves)


def gemm(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, cfg: GemmConfig | None = None, accumulate: bool = False,
         glu: int = 0) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with a dequantize-tile + ``tl.dot`` kernel: the fp16-pair one
    (gemm_h2.py) when ``cfg.h2``, else gemm.py. ``accumulate`` and ``glu`` as for ``gemv`` (outside
    the fp16-pair kernel by a second launch)."""
    from .gemm import gemm_kernel

    m, n = x.shape[0], pw.out_features
    cfg = cfg or gemm_config(pw.bits, m, n, pw.in_features)
    if cfg.h2:
        return _gemm_h2(x, pw, bias, out, cfg, accumulate, glu)
    if glu:
        _check_glu(pw, glu)
        return _glu_after(gemm(x, pw, bias, cfg=cfg), glu, out)
    if accumulate:
        if out is None or out.dtype != torch.float32:
            raise ValueError("accumulate needs out: a float32 buffer")
        return out.add_(gemm(x, pw, bias, cfg=cfg))
    x, out, zero, b = _common(x, pw, bias, out)
    plan = pw.plan
    bk = cfg.BK
    if 128 % bk or bk % plan.values_per_row:
        raise ValueError(f"BK={bk} must divide 128 and be a multiple of {plan.values_per_row}")
    if pw.tile % cfg.BN:
        raise ValueError(f"GEMM BN={cfg.BN} must divide the layout tile {pw.tile}")
    tiles = -(-m // cfg.BM) * -(-n // cfg.BN)
    iters = pw.k_pad // bk
    split, per = gemm_split(cfg, tiles, iters, x.device)
    ws, cnt = workspace(x.device, m * n, tiles) if split > 1 else (out, out)
    per_channel = pw.group_size is None
    rb = bk // plan.values_per_row
    gemm_kernel[(tiles, split)](
        x, pw.words, pw.scale, zero, b, out, ws, cnt,
        m, n, pw.in_features, x.stride(0), out.stride(0), pw.rows, pw.scale.shape[1], per, MAGIC_BITS,
        BITS=pw.bits, SYM=pw.symmetric, PER_CHANNEL=per_channel,
        GROUP_ROWS=rb if per_channel else pw.group_rows, T=pw.tile, BM=cfg.BM, BN=cfg.BN, BK=bk,
        GROUP_M=cfg.GROUP_M, HAS_BIAS=bias is not None, SPLIT=split > 1, TRANS=cfg.trans,
        DOT_F32=interpreting() and x.dtype == torch.bfloat16,
        EVICT=_evict(cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float16, bk: int = 128,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The 16-bit weight ``[out, in]`` (``(q - zero) * scale`` rounded once), by one kernel.
    bk=128: 216 µs for W4 8192->28672 on the H100 (2.74 TB/s moved) vs 241 µs at bk=64 (run 5)."""
    from .gemm import dequant_kernel

    if pw.tile % 64:
        raise ValueError(f"dequantize needs a column tile that is a multiple of 64 (its row block), got {pw.tile}")
    n, k = pw.out_features, pw.in_features
    if out is not None and (out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"dequantize out must be a contiguous {dtype} [{n}, {k}], got {out.dtype} {tuple(out.shape)}")
    w = out if out is not None else torch.empty(n, k, dtype=dtype, device=pw.words.device)
    plan = pw.plan
    bk = max(bk, plan.values_per_row)
    # per-channel weights dequantize through a one-group view: the scale applies per row anyway
    gr = pw.rows if pw.group_size is None else pw.group_rows
    dequant_kernel[(pw.n_pad // 64, pw.k_pad // bk)](
        pw.words, pw.scale, pw.zero if pw.zero is not None else pw.scale, w, n, k, pw.rows, pw.scale.shape[1],
        MAGIC_BITS, BITS=pw.bits, SYM=pw.symmetric, PER_CHANNEL=False, GROUP_ROWS=gr, T=pw.tile, BN=64, BK=bk,
        num_warps=4)
    return w


def gemm_dequant(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large M: dequantize once into a 16-bit scratch weight, then cuBLAS (compute-bound anyway)."""
    x2, _, _, _ = _common(x, pw, bias, x.new_empty(0))
    return torch.nn.functional.linear(x2, dequantize(pw, x.dtype), bias)


def _w4a8_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """W4A8's product by torch (per-token int8 x times the dequantized weight, fp32): the autotuner's
    agreement reference for the int8 tensor-core candidates."""
    from .reference import quantize_act_int8

    q, s = quantize_act_int8(x)
    y = torch.nn.functional.linear(q.float() * s, dequantize(pw, x.dtype).float())
    return y if bias is None else y + bias.float()


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes and fp32 scales of ``x`` [M, K] (one pass per row)."""
    from .w4a8 import quant_act_kernel

    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    bk = min(1024, max(16, triton_next_pow2(k)))
    quant_act_kernel[(m,)](x, q, s, m, k, x.stride(0), q.stride(0), BK=bk, num_warps=4)
    return q, s


def triton_next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def w4a8(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, cfg: GemmConfig | None = None, fuse: bool | None = None) -> torch.Tensor:
    """``quant_int8(x) @ W^T`` with per-channel symmetric int weights, int8 tensor cores."""
    from .w4a8 import w4a8_kernel

    if not pw.symmetric or pw.group_size is not None or pw.bits not in (2, 4, 8):
        raise ValueError("W4A8 needs symmetric per-channel 2/4/8-bit weights")
    m, n, k = x.shape[0], pw.out_features, pw.in_features
    if cfg is None and fuse is None and out is None:
        from . import autotune

        if autotune.enabled(x):
            key = ("w4a8", pw.bits, x.dtype, autotune.m_bucket(m), n, k, x.device.index)
            bm = 16 if m <= 16 else 64 if m <= 64 else 128
            cands = [(f"{'fused ' if f else ''}BM{bm} BN{bn}{' trans' if tr else ''}",
                      (lambda f, c: lambda x_, pw_, b_: w4a8(x_, pw_, b_, cfg=c, fuse=f))(
                          f, GemmConfig(BM=bm, BN=bn, BK=128 if m <= 64 else 64, num_warps=4 if m <= 64 else 8,
                                        trans=tr, evict=m <= 64, waves=4)))
                     for f in ((True, False) if m <= 16 else (False,))
                     for bn, tr in (((64, True), (128, True)) if m <= 64 else ((128, False), (128, True)))]
            fn = autotune.pick(key, cands, (x, pw, bias), check=lambda f: f(x, pw, bias),
                               reference=lambda: _w4a8_reference(x, pw, bias))
            if fn is not None:
                return fn(x, pw, bias)
    x, out, _, b = _common(x, pw, bias, out)
    cfg = cfg or gemm_config(pw.bits, m, n, k)
    fuse = m <= 16 if fuse is None else fuse
    if fuse:
        xin, sx = x, pw.scale  # sx unused
    else:
        xin, sx = quantize_act(x)
    bk = max(cfg.BK, 32)
    tiles = -(-m // cfg.BM) * -(-n // cfg.BN)
    iters = pw.k_pad // bk
    want = cfg.split if cfg.split is not None else (None if tiles < sm_count(x.device) else 1)
    split, per = _split(tiles, iters, want, sm_count(x.device), cfg.waves)
    ws, cnt = workspace(x.device, m * n, tiles) if split > 1 else (out, out)
    w4a8_kernel[(tiles, split)](
        xin, sx, pw.words, pw.scale, b, out, ws, cnt,
        m, n, k, xin.stride(0), out.stride(0), pw.rows, per,
        BITS=pw.bits, T=pw.tile, BM=cfg.BM, BN=cfg.BN, BK=bk, GROUP_M=cfg.GROUP_M, FUSE=fuse,
        TRANS=cfg.trans, HAS_BIAS=bias is not None, SPLIT=split > 1, EVICT=_evict(cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _candidates(bits: int, m: int, fp16_pairs: bool = False, glu: int = 0,
                acc: bool = False, tc_pairs: bool = False) -> list[tuple[str, object]]:
    """What the autotuner tries for one M (each entry ``fn(x, pw, bias)``); small on purpose.
    ``fp16_pairs``: the fp16-pair GEMV applies (W4/W3, fp16 x); ``tc_pairs``: the fp16-pair
    tensor-core GEMM does (``gemm_h2_applies``). ``glu``: each returns silu(gate) *
    up (the fp16-pair GEMV in its epilogue, every other path by a second launch). ``acc``: each is
    ``fn(x, pw, bias, out)`` and adds into the fp32 ``out`` (see ``gemv(accumulate=True)``)."""
    c: list[tuple[str, object]] = []

    def gv(**kw):
        cfg = GemvConfig(**kw)
        if acc:
            return lambda x, pw, b, o: gemv(x, pw, b, out=o, cfg=cfg, accumulate=True)
        return lambda x, pw, b: gemv(x, pw, b, cfg=cfg, glu=glu)

    def gm(**kw):
        cfg = GemmConfig(**kw)
        if acc:
            return lambda x, pw, b, o: gemm(x, pw, b, out=o, cfg=cfg, accumulate=True)
        return lambda x, pw, b: gemm(x, pw, b, cfg=cfg, glu=glu)

    if m <= 4 and fp16_pairs:  # gemv_h2.py; run 4 sweep (8192->28672): BN64 best for W4 and W3
        rs = (4, 2) if bits == 3 else (16, 8)
        # depth 2 (two iterations in registers) lost in run 5, a cp.async ring in run 7 (NOTES.md);
        # run 7: six programs per SM win the decode shapes (3584->37888: 28.7 vs 34.8 µs at eight)
        c += [(f"h2 BN{bn} R{r} w4 x{wv}", gv(BN=bn, R=r, num_warps=4, waves=wv, h2=True))
              for bn, r, wv in ((64, rs[0], 8), (64, rs[0], 6), (64, rs[0], 16), (64, rs[0], 4), (128, rs[1], 16),
                                (128, rs[0], 4), (128, rs[0], 6), (128, rs[0], 8))]
        # two iterations in flight: lost on 8192->28672 (run 5: registers cut the programs per SM),
        # tried for the decode layers, whose programs run only a few iterations each
        c += [(f"h2 BN64 R{rs[0]} w4 x{wv} d2", gv(BN=64, R=rs[0], num_warps=4, waves=wv, h2=True, depth=2))
              for wv in (4, 8)]
        # stream-K: exactly one wave of equal work (run 8: 592 tiles on 132 SMs left 4 or 5 programs per SM);
        # its segment loop holds more registers (sm_90 SASS: W4 BN64 94, W3 BN128 80, W3 BN64 72), so the
        # programs per SM are what fits, or a register cap that fits one more without spilling in the loop
        sk = (((64, 8, 64), (64, 5, None)) if bits == 4 else ((128, 7, 72), (128, 6, None), (64, 8, 64), (64, 7, None)))
        c += [(f"h2 BN{bn} R{rs[0]} w4 sk{wv}{f' r{mr}' if mr else ''}",
               gv(BN=bn, R=rs[0], num_warps=4, waves=wv, h2=True, stream_k=True, maxnreg=mr)) for bn, wv, mr in sk]
        if bits == 3:  # 28 resident warps per SM instead of 24 (run 12: 36.1 vs 37.2 µs on 8192->28672)
            c += [("h2 BN128 R4 w4 x7 r72", gv(BN=128, R=4, num_warps=4, waves=7, h2=True, maxnreg=72)),
                  ("h2 BN64 R4 w2 x14 r72", gv(BN=64, R=4, num_warps=2, waves=14, h2=True, maxnreg=72))]
        # x loaded where used: 64 registers for W3 (32 warps per SM); run 12: W3 35.9 vs 36.3 µs on
        # 28672->8192 (no gain elsewhere), W4 45.4 vs 46.1 / 45.8 on the two big shapes
        c += [("h2 BN64 R4 w2 x16 xl", gv(BN=64, R=4, num_warps=2, waves=16, h2=True, x_ahead=False)) if bits == 3
              else ("h2 BN64 R16 w4 x8 xl nc256", gv(BN=64, R=16, num_warps=4, waves=8, h2=True, x_ahead=False, evict=2))]
        # an iteration over several groups (BN32, 4 warps): 8192->28672 needs no k-split, whose epilogue was
        # 1.1-1.7 µs of the ~5.5 above the read ceiling (run 13: W3 36.1 -> 33.9 µs, W4 45.0 -> 43.6);
        # BN64 with 8 warps and BN16 with 2 lost
        wide = (() if glu else ((16, 6, False), (16, 8, False), (16, 6, True)) if bits == 3 else
                ((32, 6, True), (32, 8, True)))  # BN32 holds no gate/up block pair
        c += [(f"h2 BN32 R{r} w4 x{wv}{'' if xa else ' xl'}{' nc256' if bits == 4 else ''} wide",
               gv(BN=32, R=r, num_warps=4, waves=wv, h2=True, x_ahead=xa, evict=2 if bits == 4 else 1))
              for r, wv, xa in wide]
        if bits == 4:  # BN64 holds a gate/up pair: 8 KB of words a program an iteration, x where used, 96
            # registers (no spills in sm_90 SASS), 5 programs per SM: 660 slots for the 592 gate/up tiles (run 15)
            c += [("h2 BN64 R32 w4 x5 r96 xl nc256 wide",
                   gv(BN=64, R=32, num_warps=4, waves=5, h2=True, x_ahead=False, evict=2, maxnreg=96))]
        # weight loads asking the L2 for whole 256 B blocks (run 12)
        c += [(f"h2 BN{bn} R{rs[0]} w4 x{wv} nc256", gv(BN=bn, R=rs[0], num_warps=4, waves=wv, h2=True, evict=2))
              for bn, wv in ((64, 8), (128, 6))]
    if m <= 4:
        rs = (4, 2) if bits == 3 else (16, 8)
        mr = None if bits == 3 else 128  # W3 R4 needs 95 registers anyway
        c += [(f"gemv BN128 R{rs[0]} x8{' r128' if mr else ''}", gv(BN=128, R=rs[0], waves=8, maxnreg=mr, h2=False)),
              (f"gemv BN128 R{rs[0]} x4{' r128' if mr else ''}", gv(BN=128, R=rs[0], waves=4, maxnreg=mr, h2=False)),
              (f"gemv BN128 R{rs[0]} x16{' r128' if mr else ''}", gv(BN=128, R=rs[0], waves=16, maxnreg=mr, h2=False)),
              (f"gemv BN128 R{rs[0]} x2{' r128' if mr else ''}", gv(BN=128, R=rs[0], waves=2, maxnreg=mr, h2=False)),
              (f"gemv BN64 R{rs[0]} x4{' r128' if mr else ''}", gv(BN=64, R=rs[0], waves=4, maxnreg=mr, h2=False)),
              (f"gemv BN128 R{rs[0]} x8", gv(BN=128, R=rs[0], waves=8, h2=False)),
              (f"gemv BN128 R{rs[1]} x8", gv(BN=128, R=rs[1], waves=8, h2=False))]
        if fp16_pairs:  # of the fp32 GEMV keep the two that won before (run 3), as a reference
            c = c[:-7] + [c[-7], c[-2]]
    if 2 <= m <= 64 and tc_pairs:  # gemm_h2.py. Registers: BN64 ~80 (6 programs per SM), BN128 W4 g128 132, so
        # capped at 128 (4 per SM; no spills in sm_90 SASS). Run 9 sweeps (NOTES.md): BN128 x4 r128 best on
        # every shape but two W4 decode layers (BN64 x6); 8 warps, stream-K and deeper prefetch lost
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        c += [(f"tc-h2 BM{bm} BN{bn} x{wv}{f' r{r}' if r else ''}", gm(BM=bm, BN=bn, h2=True, waves=wv, maxnreg=r))
              for bn, wv, r in ((128, 4, 128), (64, 6, None), (64, 4, None), (128, 3, None), (128, 2, 128),
                                (128, 12, 128))]  # x12: 3 waves of k-splits; run 12 won only W3 M=4 on
        # 8192->28672 (50.3 vs 52.8 µs); x8 / x16 never (W4 M=16 8192->28672: x4 59.5, x8 60.5, x12 60.3, x16 63.9)
        c += [(f"tc-h2 BM{bm} BN128 x4 r128 nc256", gm(BM=bm, BN=128, h2=True, waves=4, maxnreg=128, evict=2))]
        if bits == 4 and bm == 16 and not glu:  # run 14: W4 words by 8-byte loads (perm), 0.9-2.8 µs faster
            # on 8192 -> 28672 and 28672 -> 8192 (M=16 x12: 59.6 -> 56.8 µs); W3 lost 0.7-1.1 µs with it
            c += [(f"tc-h2 BM{bm} BN128 x4 r128 nc256 perm",
                   gm(BM=bm, BN=128, h2=True, waves=4, maxnreg=128, evict=2, perm=True)),
                  (f"tc-h2 BM{bm} BN128 x12 r128 perm", gm(BM=bm, BN=128, h2=True, waves=12, maxnreg=128, perm=True))]
        if bm >= 32:  # the scale in the tile (one accumulator; run 13: M=64 28672 -> 8192 W4 97.7 µs, before ~110)
            c += [(f"tc-h2 BM{bm} BN256 w8 x2 r128", gm(BM=bm, BN=256, h2=True, waves=2, num_warps=8, maxnreg=128)),
                  (f"tc-h2 BM{bm} BN128 w8 x2", gm(BM=bm, BN=128, h2=True, waves=2, num_warps=8))]
    if 2 <= m <= 64:
        bm = 16 if m <= 16 else 64
        bk = 64 if bits == 3 else 128
        c += [(f"tc BM{bm} BN64 BK{bk} x4", gm(BM=bm, BN=64, BK=bk, trans=True, evict=True, waves=4)),
              (f"tc BM{bm} BN128 BK{bk} x4", gm(BM=bm, BN=128, BK=bk, trans=True, evict=True, waves=4)),
              (f"tc BM{bm} BN64 BK64 x8", gm(BM=bm, BN=64, BK=64, trans=True, evict=True, waves=8))]
    if m > 64:
        c += [("gemm BM128 BN128 BK64 w8", gm(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)),
              ("gemm BM256 BN128 BK64 w8", gm(BM=256, BN=128, BK=64, num_warps=8, num_stages=3)),
              ("gemm trans BM256 BN128 BK64 w8", gm(BM=256, BN=128, BK=64, num_warps=8, num_stages=3, trans=True)),
              ("dequant + cuBLAS", (lambda x, pw, b, o: o.add_(gemm_dequant(x, pw, b))) if acc else
               (lambda x, pw, b: _glu_after(gemm_dequant(x, pw, b), glu)))]
    return c


def _fresh_call(args: tuple, acc: bool):
    """A candidate's output on ``args`` for the autotuner's agreement check: accumulating candidates
    add into a fresh zeroed buffer (the timing one keeps growing)."""
    def run(fn):
        if acc:
            return fn(*args[:3], torch.zeros_like(args[3]))
        return fn(*args)
    return run


def matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, glu: int = 0,
           acc_out: torch.Tensor | None = None) -> torch.Tensor:
    """The dispatcher. On CUDA the first call of each (scheme, M bucket, N, K) times a few
    candidate paths and configs (``kernels.autotune``) and keeps the fastest; elsewhere, or with
    VLMQ_AUTOTUNE=0: GEMV for M <= GEMV_MAX_M, the fp16-pair tensor-core GEMM up to M=64 where it
    applies, else the tensor-core GEMM (dequantize + cuBLAS from DEQUANT_MIN_M). ``glu``: see ``gemv``.
    ``acc_out``: add the product into this zeroed-by-the-caller fp32 ``[M, N]`` buffer and return it
    (``gemv(accumulate=True)``; other paths add their result)."""
    from . import autotune

    _check_glu(pw, glu)
    m = x.shape[0]
    acc = acc_out is not None
    if acc and (glu or acc_out.dtype != torch.float32 or tuple(acc_out.shape) != (m, pw.out_features)):
        raise ValueError(f"acc_out must be a float32 [{m}, {pw.out_features}] buffer (and no glu)")
    args = (x, pw, bias, acc_out) if acc else (x, pw, bias)
    if autotune.enabled(x):
        key = ("a16", pw.bits, pw.group_size, pw.symmetric, x.dtype, autotune.m_bucket(m), pw.out_features,
               pw.in_features, x.device.index, glu, acc, pdl_mode(x.device))
        # timed on a scratch accumulator: the candidates' many calls must not add into the caller's
        timing = (x, pw, bias, torch.zeros_like(acc_out)) if acc and not autotune.decided(key) else args
        fn = autotune.pick(key, _candidates(pw.bits, m, h2_applies(x, pw), glu, acc, gemm_h2_applies(x, pw)), timing,
                           check=_fresh_call(timing, acc), reference=lambda: _glu_after(gemm_dequant(x, pw, bias), glu))
        if fn is not None:
            return fn(*args)
    if m <= GEMV_MAX_M:
        return gemv(x, pw, bias, out=acc_out, glu=glu, accumulate=acc)
    h2 = gemm_h2_config(m, pw.tile, pw.bits, glu)
    if m <= 64 and gemm_h2_applies(x, pw) and not (glu and h2.BN % (2 * glu)):  # accumulate and glu in-kernel
        return gemm(x, pw, bias, out=acc_out, cfg=h2, accumulate=acc, glu=glu)
    y = _glu_after(gemm_dequant(x, pw, bias) if m >= DEQUANT_MIN_M else gemm(x, pw, bias), glu)
    return acc_out.add_(y) if acc else y
