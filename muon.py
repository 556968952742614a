"""
Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): the optimizer train.py's
muon=True uses for the weight matrices inside the blocks, with AdamW for the embedding, the norms
and the biases. GPT.configure_optimizers (model.py) makes the groups.
"""
import torch

from common import native_bf16


def orthogonalize(G, steps=4, dtype=torch.float32):
    """Roughly U V^T for G = U S V^T: Muon's quintic Newton-Schulz iteration, whose coefficients
    move the singular values toward [0.7, 1.2] in a few steps rather than exactly to 1. Its
    matmuls in `dtype`: bfloat16, as Muon's authors run it, where that is native and faster.
    4 steps rather than their 5: a fifth less time, a few of the smallest singular values left
    below 0.5, and a whole run of config/tinystories_cpu.py as good (docs/tuning.md section 21)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = (G / G.norm().clamp(min=1e-7)).to(dtype)  # singular values at most 1, where it converges
    if G.size(0) > G.size(1):
        X = X.T  # so that the Gram matrix X X^T is the smaller one
    if dtype == torch.float32 and X.size(0) < X.size(1):
        # Each step multiplies X on the left by M = a I + b A + c A^2, a polynomial in A = X X^T,
        # and these all commute: the steps can run on the small square matrices alone (Q <- M Q,
        # A <- M A M) and touch the wide X once at the end: the same values to float rounding, with
        # 35 % fewer flops at the CPU config's shapes. fp32 only: in bf16 the product Q drifts.
        A, Q = X @ X.T, None
        for step in range(steps):
            M = torch.addmm(A, A, A, beta=b, alpha=c)
            M.diagonal().add_(a)
            Q = M if Q is None else M @ Q
            if step < steps - 1:
                A = M @ A @ M
        X = Q @ X
    else:
        for _ in range(steps):  # X <- a X + (b A + c A^2) X, the sums inside the matmuls (addmm)
            A = X @ X.T
            X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return (X.T if G.size(0) > G.size(1) else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) for the groups with
    muon=True, AdamW for the others. Muon steps along its Nesterov momentum made orthogonal:
    every direction of a weight matrix moves by the same amount, the rarely seen ones too.
    An orthogonal update's entries are small (~1/sqrt(width)), so its step is lr_ratio x lr."""

    def __init__(self, groups, lr, betas, momentum=0.95, lr_ratio=10.0, eps=1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, lr_ratio=lr_ratio,
                                      eps=eps, muon=False))
        device = next(p for group in self.param_groups for p in group['params']).device.type
        self.ns_dtype = torch.bfloat16 if native_bf16(device) else torch.float32  # for Newton-Schulz

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2) = group['lr'], group['betas']
            for p in [p for p in group['params'] if p.grad is not None]:
                g, state = p.grad, self.state[p]
                p.mul_(1 - lr * group['weight_decay'])  # decoupled weight decay, as AdamW's
                if group['muon']:
                    buf = state.setdefault('momentum', torch.zeros_like(p))
                    buf.mul_(group['momentum']).add_(g)
                    update = orthogonalize(g.add(buf, alpha=group['momentum']), dtype=self.ns_dtype)
                    p.add_(update, alpha=-lr * group['lr_ratio'] * max(1, p.size(0) / p.size(1)) ** 0.5)
                else:  # AdamW (Loshchilov & Hutter 2019)
                    if not state:
                        state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                    state['step'] += 1
                    state['m'].lerp_(g, 1 - beta1)
                    state['v'].lerp_(g.square(), 1 - beta2)
                    v_hat = state['v'] / (1 - beta2 ** state['step'])
                    p.addcdiv_(state['m'], v_hat.sqrt_().add_(group['eps']),
                               value=-lr / (1 - beta1 ** state['step']))
