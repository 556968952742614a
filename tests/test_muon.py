"""muon.py: Muon's orthogonalisation against the SVD, and its steps against torch.optim.Muon and
torch.optim.AdamW."""
import pytest
import torch

import muon
from conftest import tiny
from muon import orthogonalize


@pytest.mark.parametrize('shape', [(96, 32), (32, 96), (48, 48)])
def test_orthogonalize_keeps_singular_vectors_and_moves_singular_values_near_1(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = orthogonalize(G)
    D = U.T @ O @ Vh.T  # diagonal if the singular vectors are G's
    assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-4
    assert 0.6 < torch.diagonal(D).min() and torch.diagonal(D).max() < 1.25  # S ranges ~0.1-15x
    exact = orthogonalize(G.double(), dtype=torch.float64)  # the plain iteration, in float64
    torch.testing.assert_close(O, exact.float(), rtol=0, atol=1e-5)  # fp32: on the Gram matrix
    fast = orthogonalize(G, dtype=torch.bfloat16)  # where bf16 is native: the same to its rounding
    assert fast.dtype == G.dtype and (fast - O).norm() < 0.05 * O.norm()


def test_muon_steps_match_torch_muon_and_adamw(monkeypatch):
    """muon=True: the block matrices follow torch.optim.Muon (Keller Jordan's lr scaling, lr 10x,
    weight decay / 10: the same decay per step), everything else torch.optim.AdamW. Ours in
    float32 (as where bf16 is not native), so that only torch's bf16 rounding differs."""
    monkeypatch.setattr(muon, 'native_bf16', lambda device: False)
    def hidden(model):
        return [p for p in model.transformer.h.parameters() if p.dim() == 2]

    def steps(model, opts, idx):
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
        return [p.detach() - b for p, b in zip(model.parameters(), before)]

    idx = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))
    # the Muon part; torch's Muon orthogonalises in bfloat16: the same steps to within its rounding
    a, b = tiny(), tiny()
    muon_a = steps(a, [a.configure_optimizers(1.0, 2e-3, (0.9, 0.99), muon=True)], idx)
    rest = [p for p in b.parameters() if all(p is not h for h in hidden(b))]
    muon_b = steps(b, [torch.optim.Muon(hidden(b), lr=2e-2, weight_decay=0.1, ns_steps=4,
                                       adjust_lr_fn='original'),
                       torch.optim.AdamW([{'params': [p for p in rest if p.dim() == 2], 'weight_decay': 1.0},
                                          {'params': [p for p in rest if p.dim() == 1], 'weight_decay': 0.0}],
                                         lr=2e-3, betas=(0.9, 0.99))], idx)
    for p, step_a, step_b in zip(a.parameters(), muon_a, muon_b):
        if any(p is h for h in hidden(a)):
            assert (step_a - step_b).norm() < 0.05 * step_b.norm()  # lr_ratio 9 instead of 10: 0.1
    # the AdamW part, with the block matrices frozen: the same steps to float rounding
    a, b = tiny(), tiny()
    for p in hidden(a) + hidden(b):
        p.requires_grad_(False)
    adam_a = steps(a, [a.configure_optimizers(1.0, 2e-3, (0.9, 0.99), muon=True)], idx)
    adam_b = steps(b, [b.configure_optimizers(1.0, 2e-3, (0.9, 0.99))], idx)
    assert sum(s.abs().sum() > 0 for s in adam_a) == len(list(a.parameters())) - len(hidden(a))
    for step_a, step_b in zip(adam_a, adam_b):
        torch.testing.assert_close(step_a, step_b, rtol=1e-3, atol=1e-6)  # steps of ~lr = 2e-3
