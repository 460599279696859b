"""The training objective's three implementations against autograd on the formula written out plainly.

`objectives._fused_terms` writes its gradient by hand, `_module_terms` and `candidate_loss` let autograd
differentiate their own code: all three must give the values and gradients of
`sum over exits of coef * sum over positions of alpha * CE + (1 - alpha) * KL(teacher || exit)`.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sortedchat.training.methods import OBJECTIVES
from sortedchat.training.objectives import candidate_loss, head_loss

V, H, N = 40, 12, 7  # vocabulary, hidden size, positions
COEFS = torch.tensor([0.3, 0.7])


def problem(seed: int = 0):
    """A head, two exits' normed states, targets and a teacher (normed state, head weight)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    hiddens = [torch.randn(N, H, generator=g).requires_grad_() for _ in COEFS]
    targets = torch.randint(0, V, (N,), generator=g)
    teacher = (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g))
    return head, hiddens, targets, teacher


def by_hand(weight, hiddens, targets, alpha, teacher):
    """(total, per-exit CE sums, per-exit KL sums) with torch's own cross-entropy and KL divergence."""
    t_logp = torch.log_softmax(F.linear(*teacher), -1) if teacher is not None else None
    total, ces, kls = 0.0, [], []
    for coef, h in zip(COEFS, hiddens):
        logp = torch.log_softmax(F.linear(h, weight), -1)
        ce = F.cross_entropy(logp, targets, reduction="sum")
        kl = F.kl_div(logp, t_logp, log_target=True, reduction="sum") if t_logp is not None else torch.zeros(())
        total = total + coef * (alpha * ce + (1 - alpha) * kl)
        ces.append(ce)
        kls.append(kl)
    return total, torch.stack(ces).detach(), torch.stack(kls).detach()


def gradients(total, head_weight, hiddens):
    head_weight.grad = None
    for h in hiddens:
        h.grad = None
    (2 * total).backward()  # an upstream gradient other than 1 reaches the hand-written one too
    return [head_weight.grad.clone(), *(h.grad.clone() for h in hiddens)]


def assert_same_sums_and_gradients(got, want, head_weight, hiddens, tol):
    """`got` and `want` (total, CE sums, KL sums) and the gradients of their totals, within `tol`."""
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol)
    want_grads = gradients(want[0], head_weight, hiddens)
    for a, b in zip(gradients(got[0], head_weight, hiddens), want_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("impl", ["fused", "module"])
def test_head_loss_values_and_gradients_are_autograd_on_the_formula(objective, impl):
    alpha = OBJECTIVES[objective].alpha
    head, hiddens, targets, teacher = problem()
    teacher = teacher if OBJECTIVES[objective].needs_teacher else None
    got = head_loss(head, hiddens, targets, COEFS, alpha, teacher, impl)
    assert_same_sums_and_gradients(got, by_hand(head.weight, hiddens, targets, alpha, teacher), head.weight, hiddens,
                                   1e-5)


@pytest.mark.parametrize("objective", [name for name, o in OBJECTIVES.items() if o.needs_teacher])
def test_candidate_loss_over_the_whole_vocabulary_is_the_formula_and_its_gradient(objective):
    """With the teacher's top-K = the whole vocabulary nothing is estimated: the same numbers as the formula."""
    alpha = OBJECTIVES[objective].alpha
    head, hiddens, targets, teacher = problem(1)
    top = torch.log_softmax(F.linear(*teacher), -1).topk(V, -1)
    got = candidate_loss(head.weight, hiddens, targets, COEFS, alpha, top.indices, top.values, torch.arange(V))
    assert_same_sums_and_gradients(got, by_hand(head.weight, hiddens, targets, alpha, teacher), head.weight, hiddens,
                                   1e-4)
