"""Time the decode step's attention launches on the GPU: rotary + cache write + attention, as two
launches (rope_kv, decode_attention) or one (rope_attention: a GQA group per program, tensor
cores, cache blocks over up to 8 splits) at several block sizes and warp counts. Each is captured 16 times in a CUDA graph behind an L2 flush (minus the flushes alone),
median of 9 replays; Qwen2-7B heads (28 q, 4 kv, D 128), a 264-position cache.

    PYTHONPATH=$PWD python3 benchmarks/kernels/time_attention.py
"""

from __future__ import annotations

import torch

from kernels.autotune import _capture, _flush_l2, _replay_ms
from kernels.decode_ops import decode_attention, rope_attention, rope_kv


def main() -> None:
    hq, hkv, d, length = 28, 4, 128, 264
    dev = torch.device("cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    print(f"{torch.cuda.get_device_name()}; µs per call, L2-cold, graph of 16")
    for b in (1, 8):
        qkv = torch.randn(b, (hq + 2 * hkv) * d, device=dev).half()
        kc = torch.randn(b, hkv, length, d, device=dev).half()
        vc = torch.randn_like(kc)
        for pos in (128, 192, 255):
            p = torch.tensor([pos], dtype=torch.int32, device=dev)
            kc1, vc1 = kc.clone(), vc.clone()
            want = decode_attention(rope_kv(qkv, inv_freq, p, kc1, vc1, hq, hkv), kc1, vc1, p)
            cands = {"rope_kv + decode_attention": lambda: decode_attention(rope_kv(qkv, inv_freq, p, kc, vc, hq, hkv),
                                                                            kc, vc, p)}
            for bl in (16, 32, 64):
                for w in (2, 4, 8):
                    cands[f"rope_attention BL{bl} w{w}"] = (lambda bl=bl, w=w: rope_attention(
                        qkv, inv_freq, p, kc, vc, hq, hkv, block=bl, num_warps=w))
            g0 = _capture(lambda: _flush_l2(dev), 16)
            base = _replay_ms(g0, 9)
            row = []
            for name, fn in cands.items():
                got = fn()
                err = float((got.float() - want.float()).abs().max())
                torch.cuda.synchronize()
                g = _capture(lambda fn=fn: (_flush_l2(dev), fn()), 16)
                t = (_replay_ms(g, 9) - base) / 16 * 1000
                row.append((t, name, err))
            for t, name, err in sorted(row)[:5] + [r for r in row if r[1].startswith("rope_kv")]:
                print(f"b={b} pos={pos:3d}  {t:6.2f} µs  {name}  (max |diff| {err:.1e})")


if __name__ == "__main__":
    main()
