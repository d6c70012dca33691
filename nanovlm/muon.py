"""Muon: momentum SGD whose update for each weight matrix is orthogonalised first.

    buffer = momentum * buffer + (1 - momentum) * grad
    update = (1 - momentum) * grad + momentum * buffer          (Nesterov)
    W     -= lr * scale(W) * orthogonalise(update)

A gradient matrix is usually dominated by a few directions (its largest singular values are many times
its smallest), so a plain step moves the weights mostly along those few. `orthogonalise` keeps the
matrix's singular vectors and pushes all its singular values towards 1 (U S V^T becomes about U V^T), so
every direction moves at the same rate. It does that with five steps of a Newton-Schulz polynomial
instead of an SVD. Muon is for the 2-D weight matrices inside a network; embeddings, biases and norms stay
with AdamW (`nanovlm.trainer.make_optimizer`).

This computes what `torch.optim.Muon` computes (Jordan et al. 2024; bf16 Newton-Schulz, the same
coefficients, `adjust_lr_fn="match_rms_adamw"`), with one difference in how: matrices of the same shape
are stacked and orthogonalised together by batched matmuls, one call per shape instead of one per matrix.
A small model has many small matrices in few shapes, so much of a matrix-at-a-time step is the overhead of
small calls, which stacking removes (docs/performance.md has the timing). This file imports only torch and
the standard library.
"""

from collections import defaultdict

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c): grow small singular values fast (Muon's choice)


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """(..., m, n) matrices with their singular values pushed towards 1; the result is bf16.

    X <- a X + (b X X^T + c (X X^T)^2) X, on the wide side of each matrix (so X X^T is the smaller square),
    after dividing by the Frobenius norm, which is at least the largest singular value.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    x = x.reshape(-1, *x.shape[-2:])  # baddbmm wants exactly one batch dimension
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*g.shape[:-2], *x.shape[-2:])
    return x.mT if tall else x


def rms_scale(shape: torch.Size) -> float:
    """Step size of an (m, n) matrix relative to the learning rate: 0.2 sqrt(max(m, n)).

    An orthogonalised update has an RMS of about 1 / sqrt(max(m, n)); this factor makes it about 0.2, the
    RMS of a typical AdamW update, so that one learning rate and one schedule serve both optimizers.
    """
    return 0.2 * max(shape[-2], shape[-1]) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, with decoupled weight decay; same-shape matrices are updated together."""

    def __init__(
        self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95, ns_steps: int = 5
    ) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "ns_steps": ns_steps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates weight matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - mu)  # buffer = mu * buffer + (1 - mu) * grad
                update = torch.stack(grads).lerp_(torch.stack(bufs), mu)  # Nesterov: look one step ahead
                update = orthogonalise(update, group["ns_steps"]).to(params[0].dtype)
                torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr * rms_scale(shape))
