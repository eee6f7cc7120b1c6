"""Compile the kernels for sm_90 without a GPU and report registers, spills and the SASS of the
hot loop (instructions per decoded weight). Runs on the CPU machine: triton ships ptxas/nvdisasm.

    .venv/bin/python benchmarks/kernels/inspect_sass.py gemv --bits 4 --bn 128 --r 16
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/kernels/inspect_sass.py gemv_h2 --bits 3 --bn 64 --r 4  # triton 3.6
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 3,
                   maxnreg: int | None = None):
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    # what a real launch specializes: 16-byte aligned pointers, ints that are multiples of 16
    names = list(fn.arg_names)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if v.startswith("*") or k in DIV16}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_bin("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def loops(sass: str) -> list[list[str]]:
    """Instruction lists of the bodies of backward branches (innermost loops)."""
    lines = [l for l in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", l)]
    addr = [int(re.match(r"\s*/\*([0-9a-f]+)\*/", l).group(1), 16) for l in lines]
    out = []
    for i, l in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\()?\.?L_x_(\d+)", l)
        if not m:
            continue
        # find the label address by scanning the raw text
        lab = f".L_x_{m.group(1)}:"
        raw = sass.splitlines()
        for j, r in enumerate(raw):
            if r.strip().startswith(lab):
                nxt = next(x for x in raw[j + 1:] if re.match(r"\s*/\*[0-9a-f]{4,}\*/", x))
                target = int(re.match(r"\s*/\*([0-9a-f]+)\*/", nxt).group(1), 16)
                if target < addr[i]:
                    out.append([x for x, a in zip(lines, addr) if target <= a <= addr[i]])
                break
    return out


def histogram(instrs: list[str]) -> collections.Counter:
    c = collections.Counter()
    for l in instrs:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", l)
        if m:
            c[m.group(1).split(".")[0]] += 1
    return c


def report(kernel, label: str, values_per_iter: int | None = None) -> dict:
    md = kernel.metadata
    sass = sass_of(kernel.asm["cubin"])
    body = loops(sass)
    info = {"label": label, "shared": md.shared, "num_warps": md.num_warps}
    print(f"== {label}: shared={md.shared} B, warps={md.num_warps}")
    for i, b in enumerate(body):
        h = histogram(b)
        n = sum(h.values())
        per = f", {n * 32 * md.num_warps / values_per_iter:.2f} thread-instr/value" if values_per_iter else ""
        print(f"  loop {i}: {n} instr/warp{per}; " + " ".join(f"{k}:{v}" for k, v in h.most_common(14)))
    info["loops"] = [dict(histogram(b)) for b in body]
    return info


def resource_usage(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        r = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True)
        return " ".join(l.strip() for l in r.stdout.splitlines() if "REG" in l)
    finally:
        os.unlink(path)


DIV16 = {"N", "K", "stride_xm", "stride_om", "rows_total", "groups_pad"}

GEMV_SIG = {
    "x_ptr": "*fp16", "words_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*u8", "bias_ptr": "*fp16",
    "out_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
    "stride_xm": "i32", "stride_om": "i32", "rows_total": "i32", "groups_pad": "i32",
    "iters_per_split": "i32", "magic": "i32",
}
GEMV_SIG_EXTRA = {"n_iters": "i32"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["gemv", "gemv_h2", "gemm", "gemm_h2"])
    ap.add_argument("--depth", type=int, default=1, help="gemv_h2: iterations loaded ahead")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bn", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--bm", type=int, default=1)
    ap.add_argument("--bk", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--sass", action="store_true", help="print the hot loop")
    ap.add_argument("--trans", action="store_true")
    ap.add_argument("--uneven", action="store_true", help="masked x loads")
    ap.add_argument("--pdl", type=int, default=0, help="gemv_h2: programmatic dependent launch mode (kernels/pdl.py)")
    ap.add_argument("--glu", type=int, default=0, help="gemv_h2: silu-mul epilogue over gate/up blocks of this size")
    ap.add_argument("--stream-k", action="store_true", help="gemv_h2: stream-K grid")
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap per thread")
    ap.add_argument("--x-late", action="store_true", help="gemv_h2: x loaded where used, not an iteration ahead")
    ap.add_argument("--evict", type=int, default=1, help="weight loads: 1 evict-first, 2 nc + L2::256B (decode.load_rows)")
    ap.add_argument("--ttgir", action="store_true", help="print the TTGIR (layouts, converts)")
    ap.add_argument("--perm", action="store_true", help="gemm_h2: tile rows in the 16-byte-load column order")
    a = ap.parse_args()
    v = 32 if a.bits == 3 else 32 // a.bits
    sig = dict(GEMV_SIG)
    for k in ("x_ptr", "scale_ptr", "bias_ptr", "out_ptr"):
        sig[k] = "*" + a.dtype
    common = dict(BITS=a.bits, SYM=a.sym, PER_CHANNEL=a.group == 0, T=128, HAS_BIAS=False, SPLIT=True, EVICT=a.evict)
    if a.kernel == "gemv_h2":
        from kernels.gemv_h2 import gemv_h2_kernel
        global DIV16
        DIV16 = {"N", "K4", "stride_xm", "stride_om", "rows_total", "groups_pad"}
        sig = {**{k2: v2 for k2, v2 in sig.items() if k2 not in ("magic", "K")}, "n_iters": "i32", "K4": "i32",
               "x_ptr": "*i64"}
        c = dict(common, GROUP_ROWS=max(a.group // v, 1) if a.group else a.r, BM=a.bm, BN=a.bn, R=a.r,
                 EVEN=not a.uneven, ASM=True, DEPTH=a.depth, PDL=a.pdl, GLU=a.glu, STREAMK=a.stream_k,
                 XAHEAD=not a.x_late)
        if a.stream_k:
            sig["n_tiles"] = "i32"
        k = compile_kernel(gemv_h2_kernel, sig, c, a.warps, maxnreg=a.maxnreg or None)
        vals = a.r * a.bn * v
    elif a.kernel == "gemv":
        from kernels.gemv import gemv_kernel
        sig = {**{k2: v2 for k2, v2 in sig.items() if k2 != "magic"}, "n_iters": "i32", "magic": "i32"}
        c = dict(common, GROUP_ROWS=max(a.group // v, 1) if a.group else a.r, BM=a.bm, BN=a.bn, R=a.r, EVEN=not a.uneven)
        k = compile_kernel(gemv_kernel, sig, c, a.warps)
        vals = a.r * a.bn * v  # one iteration = R decode rows
    elif a.kernel == "gemm_h2":
        from kernels.gemm_h2 import gemm_h2_kernel
        sig = {**{k2: v2 for k2, v2 in sig.items() if k2 != "magic"}, "n_iters": "i32"}
        gr = (a.group // v if a.bits == 4 else a.group // 32) if a.group else 16
        c = dict({k2: v2 for k2, v2 in common.items() if k2 != "EVICT"}, GROUP_ROWS=gr, BM=a.bm, BN=a.bn,
                 ASM=2 if a.evict == 2 else 1, PERM=a.perm)
        k = compile_kernel(gemm_h2_kernel, sig, c, a.warps, a.stages, maxnreg=a.maxnreg or None)
        vals = 128 * a.bn
    else:
        from kernels.gemm import gemm_kernel
        c = dict(common, GROUP_ROWS=max(a.group // v, 1) if a.group else a.bk // v, BM=a.bm, BN=a.bn, BK=a.bk, GROUP_M=8, TRANS=a.trans)
        k = compile_kernel(gemm_kernel, sig, c, a.warps, a.stages)
        vals = a.bk * a.bn
    print(resource_usage(k))
    report(k, f"{a.kernel} b{a.bits} sym={a.sym} g{a.group} {c}", vals)
    if a.ttgir:
        print(k.asm["ttgir"])
    if a.sass:
        for b in loops(sass_of(k.asm["cubin"])):
            print("\n".join(b))


if __name__ == "__main__":
    main()
