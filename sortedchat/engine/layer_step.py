"""The engine's own step through one LLaMA-family decoder layer: transformers' operators, in transformers' order,
without transformers' per-call machinery.

A decoding step on a CPU runs 30 small layer calls of a few dozen operators each; around them, transformers'
layer call adds keyword deprecation wrappers, the attention-interface lookup, the cache's dispatch and the mask
checks, which cost about a third as much as the layers' own operators (BENCHMARKS.md, "Where a decoding step's
time goes"). `LayerStep` runs the same operators on the same weights: the input norm, the q/k/v projections
(with the q/k norms of the models that have them; int8 products on a model `--quantize` made so), rotary on q
and k (in fewer operators, `Span.rotation`), the K/V written into the layer's cache,
scaled-dot-product attention called exactly as transformers' `sdpa` integration calls it, the output
projection, the residual, the post-attention norm, the MLP and its residual. Same operators on the same
inputs give the same numbers bit for bit, which `step_for` checks on every layer before using a step (a probe
through both, compared with `torch.equal`, by `own_step_matches`); a layer it does not know, or whose probe
differs, is called through transformers (`TransformersCall`), as before.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sortedchat.hf_contract import cache_keyword, rotary_function
from sortedchat.int4 import joined
from sortedchat.quantize import is_quantized

_NORM_MATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # norm module -> `F.rms_norm` gives its numbers
MAX_GQA_HEAD_DIM = 256  # transformers' sdpa integration lets SDPA broadcast K/V heads up to this head size


class Span:
    """What every layer a call runs over the same positions shares: positions `start`..`start + q - 1` as ids
    (transformers' layers only), their rotary cos/sin [1, q, head_dim], the causal mask over the layer's K/V
    (None for one position), and the rotary factors of `LayerStep` (made on first use)."""

    __slots__ = ("positions", "cos", "sin", "mask", "_rotation")

    def __init__(self, positions, cos, sin, mask):
        self.positions, self.cos, self.sin, self.mask, self._rotation = positions, cos, sin, mask, None

    def rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin with the sign `rotate_half` gives it) over the heads: x * cos + x.roll(half) * signed sin is
        `apply_rotary_pos_emb`'s x * cos + rotate_half(x) * sin in 4 operators instead of 9, the same numbers
        (negating a factor is exact)."""
        if self._rotation is None:
            half = self.sin.shape[-1] // 2
            signed = torch.cat([-self.sin[..., :half], self.sin[..., half:]], dim=-1)
            self._rotation = (self.cos.unsqueeze(1), signed.unsqueeze(1))
        return self._rotation


class TransformersCall:
    """A decoder layer called through transformers, with the engine's cache (the reference, and the fallback)."""

    own = False

    def __init__(self, layer: nn.Module, cache):
        self.layer, self.cache = layer, cache
        self.keyword = cache_keyword(type(layer))  # the name depends on the transformers version

    def __call__(self, x, span: Span, cache_layer):
        return self.layer(x, attention_mask=span.mask, position_ids=span.positions, use_cache=True,
                          position_embeddings=(span.cos, span.sin), **{self.keyword: self.cache})


class LayerStep:
    """One LLaMA-family decoder layer, run operator by operator (module docstring), for a layer that
    `own_step_matches`."""

    own = True

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.norms = (norm_function(layer.input_layernorm), norm_function(layer.post_attention_layernorm))
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        # the products of one input in one call where they can be (int4: `JoinedInt4`), each in turn otherwise
        self.qkv = joined([product(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
        self.o = product(attn.o_proj)
        self.gate_up = joined([product(mlp.gate_proj), product(mlp.up_proj)])
        self.down = product(mlp.down_proj)
        self.act = mlp.act_fn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.groups = attn.num_key_value_groups

    def __call__(self, x, span: Span, cache_layer):
        """`x` [1, q, H] at the positions of `span`; `cache_layer` the layer's K/V, which the step extends by
        q positions."""
        return self.rows([(x, span, cache_layer)], span.rotation())[0]

    def rows(self, items: list[tuple[torch.Tensor, Span, object]],
             rotation: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """The layer over several sequences' inputs at once ((x [1, q, H], its span, its cache layer) each;
        `rotation` their spans' `Span.rotation` side by side, [1, 1, sum q, head_dim]): what the layer computes for
        each alone. The row-wise and element-wise work (norms, projections, rotary, the MLP) runs once over all
        positions, the K/V and attention per sequence (`sortedchat serve` batches concurrent requests so); one
        item is the plain step."""
        in_norm, post_norm = self.norms
        sizes = [x.shape[1] for x, _, _ in items]
        x = items[0][0] if len(items) == 1 else torch.cat([x for x, _, _ in items], dim=1)
        n = x.shape[1]
        shape = (1, n, -1, self.head_dim)
        h = in_norm(x)
        query, key, value = self.qkv(h)
        query, key = query.view(shape), key.view(shape)
        if self.q_norm is not None:
            query = self.q_norm(query)
        if self.k_norm is not None:
            key = self.k_norm(key)
        cos, signed_sin = rotation
        half = self.head_dim // 2
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        query = query * cos + query.roll(half, -1) * signed_sin
        key = key * cos + key.roll(half, -1) * signed_sin
        value = value.view(shape).transpose(1, 2)
        heads, lo = [], 0
        for (_, span, cache_layer), q in zip(items, sizes):
            keys, values = cache_layer.update(key[:, :, lo : lo + q], value[:, :, lo : lo + q])
            heads.append(attend(query[:, :, lo : lo + q], keys, values, span.mask, self.scaling, self.groups))
            lo += q
        out = heads[0] if len(heads) == 1 else torch.cat(heads, dim=2)
        x = x + self.o(out.transpose(1, 2).reshape(1, n, -1))
        h = post_norm(x)
        gate, up = self.gate_up(h)
        x = x + self.down(self.act(gate) * up)
        return [x] if len(items) == 1 else list(x.split(sizes, dim=1))

def product(linear: nn.Module):
    """A projection as a function of its input: `F.linear` on an `nn.Linear`'s own weight and bias (no module
    call), or a quantized one itself (`sortedchat.quantize`)."""
    if type(linear) is nn.Linear:
        return functools.partial(F.linear, weight=linear.weight, bias=linear.bias)
    return linear


def norm_function(norm: nn.Module):
    """A norm as a function of its input: torch's `F.rms_norm` on the module's weight and epsilon where it gives the
    module's own numbers on a probe (LLaMA's RMSNorm, in one operator call instead of the module's seven: 11 us
    against 19 us per call on the Xeon of issue 20), else the module's forward."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return norm.forward
    fused = functools.partial(F.rms_norm, normalized_shape=tuple(weight.shape), weight=weight, eps=eps)
    if norm not in _NORM_MATCHES:  # every decoding state makes its steps anew: probe each norm once
        g = torch.Generator(device="cpu").manual_seed(0)
        probe = (torch.randn(1, 3, weight.shape[0], generator=g) * torch.tensor([0.01, 1.0, 100.0])[:, None]).to(
            device=weight.device, dtype=weight.dtype)
        with torch.inference_mode():
            _NORM_MATCHES[norm] = torch.equal(fused(probe), norm(probe))
    return fused if _NORM_MATCHES[norm] else norm.forward


def attend(query, keys, values, mask, scaling: float, groups: int) -> torch.Tensor:
    """SDPA as transformers' `sdpa_attention_forward` calls it on a CPU or CUDA device: K/V heads broadcast by SDPA
    itself without a mask, repeated with one (the kernels differ, and so may the last bits)."""
    if groups > 1 and mask is not None:
        keys, values = (t.repeat_interleave(groups, dim=1) for t in (keys, values))
    extra = {"enable_gqa": True} if groups > 1 and mask is None else {}
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, **extra)


def own_step_matches(layer: nn.Module, cache_layer_type: type, config) -> bool:
    """Whether `LayerStep` computes for `layer` what transformers computes: a layer of a kind it knows, checked on
    a probe bit for bit (outputs and stored K/V, at three positions, then one, then three more)."""
    return _looks_like_llama(layer, config) and _same_on_a_probe(layer, cache_layer_type)


def _looks_like_llama(layer: nn.Module, config) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (
        all(type(m) is nn.Linear or is_quantized(m) for m in linears)
        and all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm"))
        and hasattr(mlp, "act_fn")
        and all(hasattr(attn, n) for n in ("head_dim", "scaling", "num_key_value_groups"))
        and attn.head_dim <= MAX_GQA_HEAD_DIM
        and rotary_function(attn) is not None
        and not getattr(config, "sliding_window", None)
        and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", None)
        and not getattr(attn, "training", False)
    )


@torch.inference_mode()
def _same_on_a_probe(layer: nn.Module, cache_layer_type: type) -> bool:
    """Both ways through `layer` on random hidden states, each with a scratch cache of its own."""
    from transformers import DynamicCache

    p = next(layer.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, 7, p.shape[-1], generator=g).to(device=p.device, dtype=p.dtype)
    dim = layer.self_attn.head_dim
    freqs = torch.arange(7, dtype=torch.float32)[:, None] / (10000.0 ** (torch.arange(0, dim, 2) / dim))[None]
    angles = torch.cat([freqs, freqs], dim=-1)[None].to(device=p.device)
    cos, sin = angles.cos().to(p.dtype), angles.sin().to(p.dtype)
    idx = layer.self_attn.layer_idx
    caches = []
    for _ in range(2):
        cache = DynamicCache()
        cache.layers = [cache_layer_type() for _ in range(idx + 1)]
        caches.append(cache)
    step, reference = LayerStep(layer), TransformersCall(layer, caches[1])
    outputs = ([], [])
    for lo, hi in ((0, 3), (3, 4), (4, 7)):
        q = hi - lo
        mask = None
        if q > 1:
            keys = torch.arange(hi, device=p.device)
            mask = (keys[None, :] <= torch.arange(lo, hi, device=p.device)[:, None])[None, None]
        span = Span(torch.arange(lo, hi, device=p.device)[None], cos[:, lo:hi], sin[:, lo:hi], mask)
        outputs[0].append(step(hidden[:, lo:hi], span, caches[0].layers[idx]))
        outputs[1].append(reference(hidden[:, lo:hi], span, caches[1].layers[idx]))
    same = all(torch.equal(a, b) for a, b in zip(*outputs))
    return same and all(torch.equal(getattr(caches[0].layers[idx], t), getattr(caches[1].layers[idx], t))
                        for t in ("keys", "values"))
