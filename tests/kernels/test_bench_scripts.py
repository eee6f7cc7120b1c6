"""The kernel experiment scripts' own kernels (benchmarks/kernels/): what they time must compute what
they claim, or their timings compare the wrong things. Interpreter, portable (no-PTX) paths."""

import importlib.util
import os

import pytest
import torch

from kernels.layout import pack
from kernels.reference import linear_ref, weight_f64

from kt_helpers import assert_matches, random_qweight, random_x

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernels")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("bits", [3, 4])
def test_layered_loop_at_level_3_is_the_product(bits, gen, device):
    """time_read_ceiling's GEMV loop (level 3, split in two, partials stored plainly) sums to x @ W^T."""
    rc = _script("time_read_ceiling")
    k, n = 512, 192
    qw = random_qweight(n, k, bits, 128, False, torch.float16, gen)
    pw = pack(qw, tile=64, device=device)
    x = random_x(1, k, torch.float16, gen, device)
    r, wpr = (4, 3) if bits == 3 else (16, 1)
    iters = pw.words.shape[1] // (r * wpr)
    out = torch.full((2, n), float("nan"), dtype=torch.float32, device=device)
    rc.layered(x, pw, out, 3, 64, r, 2, -(-iters // 2), iters, 4, asm=False)
    assert_matches(out.sum(0, keepdim=True), linear_ref(x.cpu(), qw), x, weight_f64(qw), torch.float16)


def test_read_words_kernel_reads_every_word_once(gen, device):
    """The read-only twin XORs exactly the words of its split (W3: three rows per decode row)."""
    rc = _script("time_read_ceiling")
    t, r, wpr, nt, bn = 64, 4, 3, 2, 32
    rows = 4 * r * wpr
    words = torch.randint(-2**31, 2**31 - 1, (nt, rows, t), dtype=torch.int32, generator=gen).to(device)
    out = torch.empty(2, nt * t, dtype=torch.int32, device=device)
    rc.read_words_kernel[(nt * t // bn, 2)](words, out, rows * t, 2, 4, nt * t, T=t, BN=bn, R=r, WPR=wpr)
    ref = torch.stack([words[:, s * rows // 2:(s + 1) * rows // 2].cpu() for s in range(2)])  # [split, nt, rows, t]
    x = ref[:, :, 0].clone()
    for i in range(1, rows // 2):
        x ^= ref[:, :, i]
    assert torch.equal(out.cpu(), x.reshape(2, -1))


@pytest.mark.parametrize("bits", [3, 4])
def test_tc_read_kernel_reads_gemm_h2s_words(bits, gen, device):
    """time_tc_ceiling's twin of the M=16 GEMM: each program XORs exactly the words of its column tile
    and k-range (every row once), and at level 2 its dot sums x over that range for each row of x."""
    tc = _script("time_tc_ceiling")
    k, n, split = 512, 256, 2
    qw = random_qweight(n, k, bits, 128, False, torch.float16, gen)
    pw = pack(qw, tile=128, device=device)
    x = random_x(16, k, torch.float16, gen, device)
    out = torch.zeros(split * 2 * 512, dtype=torch.int32, device=device)
    tc.read(x, pw, out, 2, 128, split, 2, 4, asm=False)
    rows_per_block = 16 if bits == 4 else 12
    words = pw.words.cpu()
    for s in range(split):
        for t in range(2):
            got = out[(s * 2 + t) * 512:(s * 2 + t) * 512 + 512].cpu()
            blk = words[t, s * 2 * rows_per_block:(s + 1) * 2 * rows_per_block]
            col = blk[0].clone()
            for r in blk[1:]:
                col ^= r
            folded = (col.view(2, 4, 2, 8)[:, :, 0] ^ col.view(2, 4, 2, 8)[:, :, 1]).reshape(-1)
            assert torch.equal(got[:64], folded)
            want = 128 * x[:, s * 256:(s + 1) * 256].double().sum(1).cpu()
            assert torch.allclose(got[256:272].view(torch.float32).double(), want, rtol=1e-3, atol=1e-2)


def test_tc_read128_kernel_reads_each_programs_words(gen, device):
    """time_tc_ceiling level 0 (16-byte loads): each program XORs its column tile's word rows over its
    k-range, every word once."""
    tc = _script("time_tc_ceiling")
    qw = random_qweight(256, 512, 4, 128, False, torch.float16, gen)
    pw = pack(qw, tile=128, device=device)
    out = torch.zeros(2 * 2 * 128, dtype=torch.int32, device=device)
    tc.read(None, pw, out, 0, 128, 2, 2, 4)
    words = pw.words.cpu()
    for s in range(2):
        for t in range(2):
            blk = words[t, s * 32:(s + 1) * 32]
            col = blk[0].clone()
            for r in blk[1:]:
                col ^= r
            assert torch.equal(out[(s * 2 + t) * 128:(s * 2 + t + 1) * 128].cpu(), col)


def test_time_cases_runs_each_case_and_keeps_the_names_in_order():
    """The scripts' shared timing loop: every case is warmed up, timed, and reported under its own
    name (CPU: capture's wall-clock timer)."""
    from pipeline.evaluate.bench_kernels import time_cases

    seen = {"a": [], "b": []}
    cases = [(n, (lambda i, n=n: seen[n].append(i))) for n in ("b", "a")]
    out = time_cases(cases, calls=3, reps=2)
    assert [n for n, _ in out] == ["b", "a"] and all(us >= 0 for _, us in out)
    assert seen["a"][0] == 0 and len(seen["a"]) >= 1 + 3 * 2 and len(seen["b"]) == len(seen["a"])
