"""Muon: the stacked update equals torch.optim.Muon's, and orthogonalise does what it says."""

import pytest
import torch

from nanovlm.muon import Muon, orthogonalise, rms_scale


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon to compare with")
def test_stacked_muon_takes_torch_muons_steps_exactly():
    # repeated shapes (stacked together), a tall, a wide and a square matrix, and one left without a gradient
    shapes = [(48, 16), (48, 16), (16, 64), (32, 32), (32, 32), (32, 32), (24, 40)]
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.9)
    ref_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            if step == 1 and i == 3:
                a.grad = b.grad = None  # no gradient this step: neither optimizer touches it
                continue
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(ours, ref, strict=True):  # the momentum buffers too, under torch's name for them
        assert torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])


def test_orthogonalise_keeps_singular_vectors_and_evens_singular_values():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 16))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    s = torch.logspace(0, -3, 16)  # singular values over three orders of magnitude
    g = u @ torch.diag(s) @ v.T
    o = orthogonalise(torch.stack([g, 2 * g])).float()  # a batch of two; scaling g changes nothing
    torch.testing.assert_close(o[0], o[1], atol=1e-2, rtol=0)
    after = torch.linalg.svdvals(o[0])
    assert after.max() < 1.3 and after.min() > 0.1  # was 1000 : 1, now within a few times of each other
    projected = u.T @ o[0] @ v  # in g's own singular basis the result is nearly diagonal
    off_diagonal = projected - torch.diag(torch.diagonal(projected))
    assert off_diagonal.abs().max() < 0.1  # bf16 arithmetic: off-diagonal noise of a few hundredths
    assert rms_scale(g.shape) == pytest.approx(0.2 * 64**0.5)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="weight matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
