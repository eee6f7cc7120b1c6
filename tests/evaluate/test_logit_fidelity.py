"""logit_fidelity against KL and top-1 written out by hand in numpy (float64), on random logits."""

import numpy as np
import torch

from pipeline.evaluate.fidelity import logit_fidelity


def _by_hand(a: np.ndarray, b: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    kls, agree = [], []
    for t in rows:
        p = np.exp(a[t] - a[t].max())
        p /= p.sum()
        q = np.exp(b[t] - b[t].max())
        q /= q.sum()
        kls.append(float(np.sum(p * (np.log(p) - np.log(q)))))
        agree.append(float(a[t].argmax() == b[t].argmax()))
    return float(np.mean(kls)), float(np.mean(agree))


def test_masked_kl_and_top1_equal_the_formula():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    T, V = 37, 501
    fp = torch.randn(T, V, generator=g) * 3
    q = fp + torch.randn(T, V, generator=g)  # close enough that some top-1s agree, some do not
    mask = torch.rand(T, generator=g) < 0.4
    mask[0] = True
    out = logit_fidelity(fp, q, mask)
    kl, top1 = _by_hand(fp.double().numpy(), q.double().numpy(), np.nonzero(mask.numpy())[0])
    assert out["tokens"] == int(mask.sum())
    assert abs(out["kl"] - kl) <= 1e-12 * max(1.0, kl) and abs(out["top1"] - top1) < 1e-15
    full = logit_fidelity(fp, q)
    kl_all, _ = _by_hand(fp.double().numpy(), q.double().numpy(), np.arange(T))
    assert full["tokens"] == T and abs(full["kl"] - kl_all) <= 1e-12 * max(1.0, kl_all)
    assert logit_fidelity(fp, fp, mask)["kl"] == 0.0
    assert logit_fidelity(fp, q, torch.zeros(T, dtype=torch.bool))["tokens"] == 0
