"""The training losses: SoFT (mean over exits), SFT (last exit), SFT+ICT (new head per exit), with CE and/or KD.

One decoder pass yields every exit's hidden states. A head is applied only at response positions and only
a chunk of positions at a time: `ExitHeadLoss` computes the loss *and its gradient* chunk by chunk in the
forward pass, so no exit ever holds a full-vocabulary logit tensor for the batch and the head is not run
twice (as activation checkpointing would). Exits that share a head (SoFT, SFT) share one weight-gradient
buffer. Under DeepSpeed ZeRO-3, whose parameters exist only inside their module's own call, the head is
instead called as a module on checkpointed chunks (`head_impl="module"`); both give the same numbers.

Per position and exit the objective is `alpha * CE(label) + (1 - alpha) * KL(teacher || exit)`, where the
teacher is the frozen starting model at full depth; each objective's alpha is in `methods.OBJECTIVES`.

Three implementations compute that one objective and must stay in step: `_fused_terms` (the default; its
gradient is written by hand, `p - alpha * onehot - (1 - alpha) * p_teacher` per logit), `_module_terms` (the
same `_chunk_terms` differentiated by autograd, for ZeRO-3) and `candidate_loss` (over the teacher's top-K,
autograd; equal to the exact objective at K = V). Change the objective in `_chunk_terms` and the hand-written
gradient in `_fused_terms` must change with it: tests/test_objectives.py checks all three, values and
gradients, against autograd on the formula written out plainly, for every objective.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from sortedchat.sorted_model import exit_head_parts
from sortedchat.training.methods import OBJECTIVES
from sortedchat.training.templates import IGNORE

CHUNK_ELEMENTS = 1 << 24  # logits held at once per chunk (64 MiB in float32)


def _chunk_terms(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float):
    """Per-position (objective, CE, KL) and the student's log-probabilities, all in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(1, targets[:, None]).squeeze(1)
    if teacher_logits is None:
        return ce, ce, torch.zeros_like(ce), logp, None
    logp_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    p_t = logp_t.exp()
    kl = (p_t * (logp_t - logp)).sum(-1)
    return alpha * ce + (1 - alpha) * kl, ce, kl, logp, p_t


def _fused_terms(weight, hiddens, targets, coefs, alpha, teacher, chunk, need_grad):
    """Sum over exits of coef * objective, per-exit CE and KL sums, and (if asked) the gradients, written by hand:
    they must stay the derivative of `_chunk_terms`' objective (module docstring; tests/test_objectives.py)."""
    n_exits = len(hiddens)
    total = torch.zeros((), dtype=torch.float32, device=weight.device)
    ce_sums = torch.zeros(n_exits, dtype=torch.float32, device=weight.device)
    kl_sums = torch.zeros(n_exits, dtype=torch.float32, device=weight.device)
    grad_h = [torch.zeros_like(h, dtype=torch.float32) for h in hiddens] if need_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad and weight.requires_grad else None
    for start in range(0, targets.shape[0], chunk):
        y = targets[start : start + chunk]
        t_logits = None
        if teacher is not None:
            t_hidden, t_weight = teacher
            t_logits = F.linear(t_hidden[start : start + chunk], t_weight)
        for e, h in enumerate(hiddens):
            hc = h[start : start + chunk]
            obj, ce, kl, logp, p_t = _chunk_terms(F.linear(hc, weight), y, t_logits, alpha)
            total += coefs[e] * obj.sum()
            ce_sums[e] += ce.sum()
            kl_sums[e] += kl.sum()
            if not need_grad:
                continue
            g = logp.exp_()  # d objective / d logits = p - alpha * onehot - (1 - alpha) * p_teacher
            g.scatter_add_(1, y[:, None], torch.full_like(y[:, None], -alpha, dtype=g.dtype))
            if p_t is not None:
                g.sub_((1 - alpha) * p_t)
            g.mul_(coefs[e])
            grad_h[e][start : start + chunk] = torch.mm(g.to(weight.dtype), weight).float()
            if grad_w is not None:
                grad_w += torch.mm(g.t().to(hc.dtype), hc).float()
    return total, ce_sums, kl_sums, grad_h, grad_w


class ExitHeadLoss(torch.autograd.Function):
    """Loss of one head over several exits' (normed) hidden states, gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, weight, targets, coefs, alpha, teacher, chunk, *hiddens):
        total, ce_sums, kl_sums, grad_h, grad_w = _fused_terms(weight, hiddens, targets, coefs, alpha, teacher, chunk,
                                                               True)
        ctx.save_for_backward(*(g for g in grad_h))
        ctx.grad_w = grad_w
        ctx.dtypes = (weight.dtype, [h.dtype for h in hiddens])
        ctx.mark_non_differentiable(ce_sums, kl_sums)
        return total, ce_sums, kl_sums

    @staticmethod
    def backward(ctx, grad_total, _ce, _kl):
        w_dtype, h_dtypes = ctx.dtypes
        grad_w = None if ctx.grad_w is None else (ctx.grad_w * grad_total).to(w_dtype)
        grad_h = [(g * grad_total).to(dt) for g, dt in zip(ctx.saved_tensors, h_dtypes)]
        ctx.grad_w = None
        return (grad_w, None, None, None, None, None, *grad_h)


def _module_terms(head: nn.Module, hiddens, targets, coefs, alpha, teacher, chunk):
    """The same sums with the head called as a module on checkpointed chunks (autograd does the rest): in step
    with `_fused_terms` (module docstring)."""
    n_exits = len(hiddens)
    total = 0.0
    ce_sums = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
    kl_sums = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)

    def piece(hc, y, t_logits, coef):
        obj, ce, kl, _, _ = _chunk_terms(head(hc), y, t_logits, alpha)
        return coef * obj.sum(), ce.sum().detach(), kl.sum().detach()

    for start in range(0, targets.shape[0], chunk):
        y = targets[start : start + chunk]
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = F.linear(teacher[0][start : start + chunk], teacher[1])
        for e, h in enumerate(hiddens):
            hc = h[start : start + chunk]
            if torch.is_grad_enabled():
                obj, ce, kl = checkpoint(piece, hc, y, t_logits, coefs[e], use_reentrant=False)
            else:
                obj, ce, kl = piece(hc, y, t_logits, coefs[e])
            total = total + obj
            ce_sums[e] += ce
            kl_sums[e] += kl
    return total, ce_sums, kl_sums


def head_loss(head: nn.Linear, hiddens, targets, coefs, alpha, teacher=None, impl="fused"):
    """(sum over exits and positions of coef * objective, per-exit CE sums, per-exit KL sums).

    `hiddens` are the normed hidden states of each exit at the response positions, `targets` the tokens
    they predict, `teacher` an optional (normed hidden, head weight) pair of the frozen model.
    """
    chunk = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    if impl == "module":
        return _module_terms(head, hiddens, targets, coefs, alpha, teacher, chunk)
    if torch.is_grad_enabled() and (head.weight.requires_grad or any(h.requires_grad for h in hiddens)):
        return ExitHeadLoss.apply(head.weight, targets, coefs, alpha, teacher, chunk, *hiddens)
    total, ce_sums, kl_sums, _, _ = _fused_terms(head.weight, hiddens, targets, coefs, alpha, teacher, chunk, False)
    return total, ce_sums, kl_sums


def _candidate_piece(weight, w_neg, negatives, rest_count, h, top_ids, top_logp, y, coef, alpha):
    """One chunk of `candidate_loss`: (coef * objective sum, CE sum, KL sum)."""
    wide = torch.promote_types(h.dtype, torch.float32)  # float32 at least, float64 where given (gradcheck)
    s_top = torch.einsum("ph,pkh->pk", h, F.embedding(top_ids, weight)).to(wide)
    if rest_count > 0:
        clash = (top_ids[:, :, None] == negatives[None, None, :]).any(1)
        s_neg = (h @ w_neg.t()).to(wide).masked_fill(clash, float("-inf"))
        valid = (~clash).sum(-1, keepdim=True).clamp_min(1)
        rest = torch.logsumexp(s_neg + torch.log(rest_count / valid), dim=-1, keepdim=True)
    else:  # the top-K is the whole vocabulary: nothing rests
        rest = torch.full_like(s_top[:, :1], float("-inf"))
    z = torch.cat([s_top, rest], dim=-1)
    logq = torch.log_softmax(z, dim=-1)
    p_top = top_logp.exp()
    p_rest = (1 - p_top.sum(-1, keepdim=True)).clamp_min(0) if rest_count > 0 else torch.zeros_like(rest)
    p = torch.cat([p_top, p_rest], dim=-1)
    logp = torch.cat([top_logp, torch.log(p_rest.clamp_min(1e-30))], dim=-1)
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    ce = torch.logsumexp(z, dim=-1) - (h * F.embedding(y, weight)).sum(-1).to(wide)
    obj = alpha * ce + (1 - alpha) * kl
    return coef * obj.sum(), ce.sum().detach(), kl.sum().detach()


def candidate_loss(weight, hiddens, targets, coefs, alpha, top_ids, top_logp, negatives, chunk=256):
    """The objective over the teacher's top-K candidates plus a "rest" bucket, never the whole vocabulary.

    Per position the teacher's distribution becomes K+1 buckets (its top-K ids, and the rest of its mass).
    The student's logits are computed only at those K ids (their head rows gathered) and at `negatives`,
    ids sampled uniformly once per step and shared by every position: the rest bucket's log-mass is the
    negatives' logsumexp scaled to the V-K ids outside the top-K (a sampled softmax). KL is taken over the
    buckets, CE on the target with the same estimated normaliser. With K = V both equal the exact
    full-vocabulary losses; they approach them as K grows (tests/test_train.py checks both).
    Chunks of positions are checkpointed, so a step never holds a [positions, K, hidden] gather for backward.
    Its objective is `_chunk_terms`' over buckets: the three implementations stay in step (module docstring).
    """
    n_exits = len(hiddens)
    V = weight.shape[0]
    K = top_ids.shape[1]
    w_neg = weight[negatives]
    rest_count = float(max(V - K, 0))
    total = 0.0
    ce_sums = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
    kl_sums = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
    for start in range(0, targets.shape[0], chunk):
        sl = slice(start, start + chunk)
        for e, h in enumerate(hiddens):
            args = (weight, w_neg, negatives, rest_count, h[sl], top_ids[sl], top_logp[sl], targets[sl], coefs[e],
                    alpha)
            if torch.is_grad_enabled() and h.requires_grad:
                obj, ce, kl = checkpoint(_candidate_piece, *args, use_reentrant=False)
            else:
                obj, ce, kl = _candidate_piece(*args)
            total = total + obj
            ce_sums[e] += ce
            kl_sums[e] += kl
    return total, ce_sums, kl_sums


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model`) of a causal LM, looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def lm_head_of(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head


@torch.no_grad()
def top_k_of(normed_hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs) of the K most likely tokens at each position, the full head applied in chunks."""
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    ids, logp = [], []
    for start in range(0, normed_hidden.shape[0], chunk):
        top = torch.log_softmax(F.linear(normed_hidden[start : start + chunk], weight).float(), -1).topk(k, -1)
        ids.append(top.indices)
        logp.append(top.values)
    if not ids:
        return torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k))
    return torch.cat(ids), torch.cat(logp)


@contextlib.contextmanager
def skipped(model: nn.Module, layers: tuple[int, ...]):
    """Within the block, decoder layers `layers` (0-based) return their input: layer dropout for one step.

    The hook goes first among the layer's forward hooks, so transformers' hidden-state recorder (a hook
    too) records the passed-through state, as the exits must see it."""
    def passthrough(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    stack = decoder_of(model).layers
    handles = [stack[i].register_forward_hook(passthrough, with_kwargs=True, prepend=True) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class SortedObjective(nn.Module):
    """Forward is the loss of one micro-batch; this is the module accelerate wraps (DDP/FSDP/DeepSpeed).

    method "soft"/"sft": the model is trained and every exit uses the shared norm + LM head (behind its
    lens, where `exit_lenses` are given and trained with it).
    method "lens": the model is frozen; only `exit_lenses` (one affine map per intermediate exit) are trained.
    method "ict": the model is frozen; `exit_heads` (one norm + head per intermediate exit) are trained.
    """

    def __init__(self, model: nn.Module, num_layers: int, objective: str = "ce", exit_heads: nn.Module | None = None,
                 teacher: nn.Module | None = None, head_impl: str = "fused", exit_lenses: nn.Module | None = None,
                 freeze_decoder: bool = False, top_k: int = 0):
        super().__init__()
        self.model = model
        self.exit_heads = exit_heads
        self.exit_lenses = exit_lenses
        self.num_layers = num_layers
        self.alpha = OBJECTIVES[objective].alpha
        self.head_impl = head_impl
        self.freeze_decoder = freeze_decoder or exit_heads is not None
        # Not a submodule: the frozen teacher is neither trained, wrapped nor checkpointed.
        self._teacher = [teacher] if teacher is not None else []
        self.uses_teacher = OBJECTIVES[objective].needs_teacher
        self.top_k = top_k  # > 0: distil over the teacher's top-K (from `teacher_top`, or computed per call)

    def _teacher_hidden(self, input_ids, attention_mask, select, position_ids=None):
        """The frozen starting model's normed last hidden state at the response positions."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        with torch.no_grad():
            if self._teacher:
                teacher = self._teacher[0]
                out = decoder_of(teacher)(**inputs)
                return out.last_hidden_state[:, :-1][select], lm_head_of(teacher).weight
            if self.freeze_decoder:  # the decoder itself is the frozen starting model
                out = decoder_of(self.model)(**inputs)
                return out.last_hidden_state[:, :-1][select], lm_head_of(self.model).weight.detach()
            with self.model.disable_adapter():  # LoRA: the base is the starting model
                out = decoder_of(self.model)(**inputs)
            return out.last_hidden_state[:, :-1][select], lm_head_of(self.model).weight.detach()

    def _exit_head(self, exit_layer: int):
        """(norm or None, head) of an exit, as `sorted_model.exit_head_parts` decides for the engine; None at the
        full depth, whose hidden state HF returns already normed."""
        if exit_layer == self.num_layers:
            return None, lm_head_of(self.model)
        return exit_head_parts(exit_layer, self.num_layers, decoder_of(self.model).norm, lm_head_of(self.model),
                               self.exit_heads, self.exit_lenses)

    def forward(self, input_ids, labels, exits: list[int], coefs: torch.Tensor, attention_mask=None,
                position_ids=None, teacher_top=None, negatives=None, agreement: bool = False,
                skip_layers: tuple[int, ...] = ()):
        """(sum over `exits` of coefs[i] * objective summed over response tokens, per-exit CE sums, KL sums),
        and with `agreement=True` also how many positions each exit's top-1 equals the last exit's.

        `teacher_top` (ids, log-probs) [positions, K]: the cached teacher top-K at the scored positions, in
        the order they are flattened here; with it the shared head's exits use `candidate_loss` over those
        ids and `negatives`, and no teacher runs. Packed rows come with `position_ids` and no attention mask.
        `skip_layers` (0-based) pass their input through unchanged in this call: LayerSkip's layer dropout.
        """
        select = labels[:, 1:] != IGNORE
        targets = labels[:, 1:][select]
        teacher = None
        # A frozen decoder is the teacher itself: its own last hidden state below serves, with no second pass.
        if self.uses_teacher and teacher_top is None and not self.freeze_decoder:
            teacher = self._teacher_hidden(input_ids, attention_mask, select, position_ids)
        grad = torch.is_grad_enabled() and not self.freeze_decoder
        with torch.set_grad_enabled(grad), skipped(self.model, skip_layers):
            out = decoder_of(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         use_cache=False, output_hidden_states=True)
        if self.uses_teacher and teacher is None and teacher_top is None:
            teacher = (out.last_hidden_state[:, :-1][select].detach(), lm_head_of(self.model).weight.detach())
        if self.top_k and teacher_top is None and teacher is not None and negatives is not None:
            teacher_top = top_k_of(teacher[0], teacher[1], self.top_k)
        groups: dict[int, tuple[nn.Module, list[int], list[torch.Tensor]]] = {}
        for i, e in enumerate(exits):
            norm, head = self._exit_head(e)
            h = out.hidden_states[e][:, :-1][select]
            groups.setdefault(id(head), (head, [], []))
            groups[id(head)][1].append(i)
            groups[id(head)][2].append(h if norm is None else norm(h))
        total = 0.0
        ce_sums = torch.zeros(len(exits), dtype=torch.float32, device=targets.device)
        kl_sums = torch.zeros_like(ce_sums)
        shared = lm_head_of(self.model)
        for head, index, hiddens in groups.values():  # exits sharing a head share one call
            if teacher_top is not None and head is shared:
                part, ce, kl = candidate_loss(head.weight, hiddens, targets, coefs[index], self.alpha,
                                              teacher_top[0], teacher_top[1], negatives)
            else:
                part, ce, kl = head_loss(head, hiddens, targets, coefs[index], self.alpha, teacher, self.head_impl)
            total = total + part
            ce_sums[index] = ce
            kl_sums[index] = kl
        if not agreement:
            return total, ce_sums, kl_sums
        return total, ce_sums, kl_sums, self._agreement(out.hidden_states, select, exits)

    @torch.no_grad()
    def _agreement(self, hidden_states, select, exits: list[int]) -> torch.Tensor:
        """Per exit, how many scored positions' top-1 equals the full depth's (in chunks of the full head)."""
        counts = torch.zeros(len(exits), dtype=torch.float32, device=select.device)
        last = hidden_states[self.num_layers][:, :-1][select]
        states = [(hidden_states[e][:, :-1][select], *self._exit_head(e)) for e in exits]  # gathered once
        chunk = max(1, CHUNK_ELEMENTS // lm_head_of(self.model).weight.shape[0])
        for start in range(0, last.shape[0], chunk):
            top_last = lm_head_of(self.model)(last[start : start + chunk]).argmax(-1)
            for i, (h_all, norm, head) in enumerate(states):
                h = h_all[start : start + chunk]
                top = head(h if norm is None else norm(h)).argmax(-1)
                counts[i] += (top == top_last).sum()
        return counts
