"""The compiled decoding step (`--compile`): one graph, made by `torch.compile`, that runs a LLaMA-family layer over
one position, for every layer.

Decoding one token at a time runs 30 layer calls of a few dozen small operators each; on a CPU their dispatch and
the Python around them cost about as much as a third of the layers' matrix products (BENCHMARKS.md, issue 20).
Inductor fuses the norms, rotary, residuals and the activation into a few kernels. The graph takes everything a
layer differs by as arguments (its weights, its K/V buffer), never as attributes, so the guards of one graph hold
for every layer of the same shapes, and the K/V length is a dynamic dimension, so a chat never recompiles.

Only the common case is compiled: one position, no mask, a K/V buffer (`GrowingLayer`) with room for it. Prefill,
drains of waiting positions, propagation and a full buffer run the engine's own eager step (`LayerStep`), which
stays the reference: the compiled step computes the same operators, but fused kernels may round differently, so
its tokens are checked against eager in tests/test_compiled.py, not its bits.

A model `--quantize int8` made runs its layers' products in the graph with int8 weights (one scale per 32 inputs,
`Int8Linear.grouped`) on float32 inputs, dequantized where inductor fuses them into the product: on a CPU about the
eager int8 kernels' speed, and closer to float32 than they are (they quantize the inputs too; BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sortedchat import first_line
from sortedchat.engine.layer_step import LayerStep, Span
from sortedchat.progress import Progress, quiet
from sortedchat.quantize import GROUP, PROJECTIONS, is_int8
from sortedchat.quantize import kind as quantization
from sortedchat.sorted_model import SortedModel

PROBE_TOLERANCE = 1e-3  # the probe's compiled and eager outputs differ by at most this share (norms), or eager stays

_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its `DecodeGraph`, once compiled
_PROBLEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why `compile_steps` left it eager


class DecodeGraph:
    """The compiled `one_position` of one model, shared by its layers; `problem` says why it stopped being used
    (None while it works)."""

    def __init__(self, layer: nn.Module):
        attn = layer.self_attn
        self.constants = (layer.input_layernorm.variance_epsilon, attn.scaling, attn.head_dim)
        # The C++ wrapper calls the graph's kernels without Python between them: the 30 layers' CPU time per token
        # fell 6-8% against eager with it, 1-4% without (issue 20, BENCHMARKS.md).
        self.function = torch.compile(one_position, options={"cpp_wrapper": True})
        self.problem: str | None = None
        self.traced = False

    def __call__(self, x, rotation, keys, values, weights) -> torch.Tensor | None:
        """The layer's output, or None if compiling or running the graph failed (then never again: eager)."""
        if not self.traced:  # the K/V length varies within a chat: one graph for every length
            for t in (keys, values):
                torch._dynamo.maybe_mark_dynamic(t, 2)
            self.traced = True
        try:
            return self.function(x, *rotation, keys, values, weights, *self.constants)
        except Exception as exc:  # no C++ compiler, an unsupported operator...: eager from now on
            self.problem = f"--compile: the compiled step failed, decoding eagerly ({first_line(exc)})"
            return None


class CompiledStep(LayerStep):
    """A layer's step with `--compile`: the shared graph for one position at the end of a `GrowingLayer`'s buffer
    with room for it (the common decoding step), the eager `LayerStep` for everything else (and, being one, for the
    server's batched layers)."""

    def __init__(self, layer: nn.Module, graph: DecodeGraph):
        super().__init__(layer)
        self.graph = graph
        attn, mlp = layer.self_attn, layer.mlp
        self.weights = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                        *(((*p.grouped, p.bias) if is_int8(p) else (p.weight, None, p.bias))
                          for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                    mlp.gate_proj, mlp.up_proj, mlp.down_proj)))

    def __call__(self, x, span: Span, cache_layer):
        n = cache_layer.get_seq_length()
        buffers = None
        if x.shape[:2] == (1, 1) and n and self.graph.problem is None and torch.is_inference_mode_enabled():
            # Room for one more than it writes: K/V filling the buffer to the end would be contiguous, which the
            # graph's guards tell apart (a recompile); that last position goes eagerly.
            buffers = cache_layer.room(2)
        if buffers is not None:
            keys, values = buffers[0][..., : n + 1, :], buffers[1][..., : n + 1, :]
            out = self.graph(x, span.rotation(), keys, values, self.weights)
            if out is not None:
                cache_layer.keys, cache_layer.values = keys, values
                return out
        return super().__call__(x, span, cache_layer)


def one_position(x, cos, signed_sin, keys, values, weights, eps: float, scaling: float, head_dim: int):
    """`LayerStep.__call__` for x [1, 1, H] at the last position of `keys`/`values` (views of the layer's buffer,
    [1, kv_heads, n + 1, head_dim]), whose K/V it writes there. `weights`: the two norms' weights and the seven
    projections' (weight, scales, bias): scales None for float weights (`linear`)."""
    in_w, post_w, q, k, v, o, gate, up, down = weights
    shape = (1, 1, -1, head_dim)
    h = rms_norm(x, in_w, eps)
    query = linear(h, *q).view(shape).transpose(1, 2)
    key = linear(h, *k).view(shape).transpose(1, 2)
    half = head_dim // 2
    query = query * cos + query.roll(half, -1) * signed_sin
    keys[:, :, -1:] = key * cos + key.roll(half, -1) * signed_sin
    values[:, :, -1:] = linear(h, *v).view(shape).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, keys, values, scale=scaling,
                                         enable_gqa=keys.shape[1] != query.shape[1])
    x = x + linear(out.transpose(1, 2).reshape(1, 1, -1), *o)
    h = rms_norm(x, post_w, eps)
    return x + linear(F.silu(linear(h, *gate)) * linear(h, *up), *down)


def linear(x, weight, scale, bias):
    """`F.linear`, or for int8 weights with one scale per `GROUP` inputs (`scale` not None) the product with the
    weights dequantized, written as the reduction inductor fuses into one kernel reading the int8 weights once."""
    if scale is None:
        return F.linear(x, weight, bias)
    rows = weight.shape[0]
    dequantized = (weight.view(rows, -1, GROUP).to(x.dtype) * scale.unsqueeze(-1)).view(rows, -1)
    out = (x.unsqueeze(-2) * dequantized).sum(-1)
    return out if bias is None else out + bias


def rms_norm(x, weight, eps: float):
    """transformers' `LlamaRMSNorm`: in float32, scaled by the weight in the input's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def plain(layer: nn.Module) -> bool:
    """Whether `one_position` is this layer's computation as far as its parts tell: plain linear projections (or
    `--quantize`'s, with their grouped int8 weights),
    LLaMA's RMSNorm (`variance_epsilon`, no offset), SiLU, no q/k norms. The warm-up's probe checks the numbers."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return (
        all(type(p) is nn.Linear or is_int8(p) and p.grouped is not None
            for p in (getattr(m, n, None) for m, names in ((attn, "qkvo"), (mlp, ("gate", "up", "down")))
            for n in (f"{c}_proj" for c in names)))
        and all(type(norm).__name__ == "LlamaRMSNorm" for norm in norms)
        and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
        and getattr(attn, "q_norm", None) is None and getattr(attn, "k_norm", None) is None
    )


def with_compiled(sm: SortedModel, steps: list) -> list:
    """`steps` with the compiled step in place of each eager `LayerStep` of a plain layer, once `compile_steps`
    compiled `sm` (and while its graph works); `steps` as they are otherwise."""
    graph = _GRAPHS.get(sm.model)
    if graph is None or graph.problem is not None:
        return steps
    steps[:] = [CompiledStep(layer, graph) if type(s) is LayerStep and plain(layer) else s
                for s, layer in zip(steps, sm.layers)]
    return steps


def compile_steps(sm: SortedModel, progress: Progress = quiet) -> str | None:
    """`--compile`: compile the decoding step of `sm` now (inductor's on-disk cache makes a second start faster),
    check it on a probe against the eager step, and use it in every `LayeredState` made afterwards. Returns None,
    or the one line saying why decoding stays eager."""
    if sm.num_layers == 0 or not plain(sm.layers[0]):
        why = " (--quantize int4 products are not compiled)" if quantization(sm) == "int4" else ""
        problem = _PROBLEMS[sm.model] = ("--compile: this model's layers are not the kind the compiled step "
                                         f"knows{why}; decoding eagerly")
        return problem
    progress("compiling the decoding step", None)
    graph = _GRAPHS[sm.model] = DecodeGraph(sm.layers[0])
    with _graph_products(sm):
        compiled, eager = _probe(sm, compiled=True), _probe(sm, compiled=False)
    problem = graph.problem
    # Fused kernels round differently, and 30 layers add it up (about 1e-5 of the norm on SmolLM2); a computation
    # that is not the layer's is off by its whole size.
    if problem is None and (compiled - eager).norm() > PROBE_TOLERANCE * eager.norm():
        problem = "--compile: the compiled step does not compute what the eager one does; decoding eagerly"
    if problem is not None:
        del _GRAPHS[sm.model]
        _PROBLEMS[sm.model] = problem
    return problem


def compile_problem(sm: SortedModel) -> str | None:
    """Why `sm` decodes eagerly although `compile_steps` was asked (at load, or its graph failed since), or None."""
    graph = _GRAPHS.get(sm.model)
    return _PROBLEMS.get(sm.model) or (graph.problem if graph is not None else None)


@contextlib.contextmanager
def _graph_products(sm: SortedModel):
    """While the probe runs, an int8 model's projections compute eagerly what the graph's do (`linear` on their
    grouped weights), so that the probe compares the same products: their own eager kernels quantize the inputs
    too, which on SmolLM2's probe tokens puts them 29% of the norm away from the graph's (and both over 100% from
    float32's: the probe's special tokens have outsized activations)."""
    modules = [m for layer in sm.layers for m in map(layer.get_submodule, PROJECTIONS) if is_int8(m)]
    for m in modules:
        m.forward = lambda x, m=m: linear(x, *m.grouped, m.bias)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


@torch.inference_mode()
def _probe(sm: SortedModel, compiled: bool) -> torch.Tensor:
    """The full depth's output for three tokens after a two-token prompt, with the compiled steps or without."""
    from sortedchat.engine.state import LayeredState  # the state uses this module's steps

    state = LayeredState(sm)
    if not compiled:
        state.steps[:] = [LayerStep(layer) if type(step) is CompiledStep else step
                          for step, layer in zip(state.steps, sm.layers)]
    state.run(sm.num_layers, [1, 2])
    return torch.cat([state.run(sm.num_layers, [token]) for token in (3, 4, 5)], dim=1)
