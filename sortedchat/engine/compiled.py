"""The compiled decoding step (`--compile`): one graph, compiled ahead of time by AOTInductor, that runs a LLaMA-family
layer over one position, for every layer.

Decoding one token at a time runs 30 layer calls of a few dozen small operators each; on a CPU their dispatch and
the Python around them cost about as much as a third of the layers' matrix products in float32, and more than the
products themselves with 4-bit weights (BENCHMARKS.md, issue 20). Inductor fuses the norms, rotary, the K/V write,
the residuals, the activation and the casts into a few C++ kernels around the products; AOTInductor builds them into
a shared library called from C++ without dynamo's guards or Python between the kernels (`torch.compile`'s graph,
called through dynamo, left nearly twice as much time around the products: BENCHMARKS.md). The graph takes
everything a layer differs by as inputs (its weights, its K/V), so one library serves every layer of the same
shapes, and the K/V length is a dynamic dimension, so a chat never recompiles. The library is compiled once per
model shape, kind of weights, CPU and thread count (its kernels are made for those) and kept in the cache folder
(`aot_library`): a later start loads it in milliseconds.

Only the common case is compiled: one position, no mask, a K/V buffer (`GrowingLayer`) with room for it. Prefill,
drains of waiting positions, propagation and a full buffer run the engine's own eager step (`LayerStep`), which
stays the reference: the compiled step computes the same operators, but fused kernels may round differently, so its
tokens are checked against eager in tests/test_compiled.py, not its bits.

Products: float32 weights and `--quantize int8`'s (int8 weights with one scale per 32 inputs, `Int8Linear.grouped`,
on float32 inputs, dequantized in the product) as reductions inductor writes itself (`linear`), and `--quantize
int4`'s (torch's int4 kernel on the same packed blocks as eagerly, joined where the eager step joins them, the
adapter beside them as two more reductions, on float16 copies where those hold its values exactly: `adapter_dtype`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sortedchat import first_line
from sortedchat.engine.aot_library import library
from sortedchat.engine.layer_step import LayerStep, Span
from sortedchat.int4 import Int4Linear, JoinedInt4, block_product
from sortedchat.progress import Progress, quiet
from sortedchat.quantize import GROUP, PROJECTIONS, is_int8
from sortedchat.sorted_model import SortedModel

# The probe's compiled and eager layers differ by at most this share (`_probe`), or eager stays: in float32 (fused
# sums in another order: 5e-7 on SmolLM2), in half precision (roundings beyond the residual stream's: 6e-3
# on SmolLM2 in bfloat16), and with int4 products, which round their inputs to bfloat16 (a norm one float32 ulp
# apart rounds some to the other neighbour: 1.2e-3 on SmolLM2, on an AMD EPYC, 2026-12-02).
PROBE_TOLERANCE, HALF_TOLERANCE, INT4_TOLERANCE = 1e-3, 5e-2, 1e-2

_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its `DecodeGraph`, once compiled
_PROBLEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why `compile_steps` left it eager
# first product of a group -> (the `lora` tuples and the dtype its `adapter_copies` were made from, the copies)
_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ADAPTER_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> `adapter_dtype`


class Part(NamedTuple):
    """A product in the graph's plan."""

    kind: str  # "float", "int8" (grouped weights) or "int4" (blocks)
    size: int  # outputs
    lora: bool  # an adapter beside it (int4)
    bias: bool


class Group(NamedTuple):
    """Products of one input in the graph's plan (a layer's q/k/v, o, gate/up, down)."""

    joined: bool  # one int4 kernel call over the parts' blocks side by side (as the eager step's `JoinedInt4`)
    adapters_joined: bool  # joined, every part adapted: their A side by side, one reduction over the input for all
    parts: tuple[Part, ...]


class DecodeGraph:
    """The compiled `one_position` of one model's layers (`plan`: what their inputs are), one library per thread
    count; `problem` says why it stopped being used (None while it works)."""

    def __init__(self, step: "CompiledStep"):
        self.plan, self.constants = step.plan, step.constants
        self.layout = layout(step.tensors)
        self.example = step.tensors  # layer 0's own: traced (by shape) to compile for another thread count
        self.loaders: dict[int, object] = {}
        self.problem: str | None = None

    def loader(self):
        """The library for torch's current thread count (its kernels' parallel regions are compiled for it; a count
        set after loading compiles one when first decoding at it): loaded from the cache folder, or compiled."""
        threads = torch.get_num_threads()
        if threads not in self.loaders:
            self.loaders[threads] = library(Path(__file__).read_bytes(), (self.plan, self.layout, self.constants),
                                            self._build).loader
        return self.loaders[threads]

    def run(self, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        """The layer's output, or None if compiling or running the graph failed (then never again: eager)."""
        try:
            return self.loader().run(inputs)[0]
        except Exception as exc:  # no C++ compiler, an unsupported operator...: eager from now on
            self.problem = f"--compile: the compiled step failed, decoding eagerly ({first_line(exc)})"
            return None

    def _build(self, path: str) -> None:
        """Export `one_position` for this plan, the K/V length a dynamic dimension, and compile it to `path`."""
        norm, head_dim = self.example[0], self.constants[2]
        kv_heads = self.plan[0].parts[1].size // head_dim  # the key projection's outputs
        rotation = norm.new_zeros(1, 1, 1, head_dim)
        keys = norm.new_zeros(3, kv_heads, head_dim)  # two positions and the new one
        positions = torch.export.Dim("positions", min=2)
        with torch.inference_mode():
            program = torch.export.export(
                _Graph(self), (norm.new_zeros(1, 1, norm.shape[0]), rotation, rotation.clone(), keys, keys.clone(),
                               list(self.example)),
                dynamic_shapes={"x": None, "cos": None, "signed_sin": None, "keys": {0: positions},
                                "values": {0: positions}, "tensors": [None] * len(self.example)})
            torch._inductor.aoti_compile_and_package(program, package_path=path)


class CompiledStep(LayerStep):
    """A layer's step with `--compile`: the shared graph for one position at the end of a `GrowingLayer`'s buffer
    with room for it (the common decoding step), the eager `LayerStep` for everything else (and, being one, for the
    server's batched layers). `plan` and `tensors`: the graph's inputs that are this layer's."""

    def __init__(self, layer: nn.Module, graph: DecodeGraph | None = None, adapters: torch.dtype = torch.float32):
        super().__init__(layer)
        self.graph, self.adapters = graph, adapters
        attn = layer.self_attn
        groups = [(self.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (None, (attn.o_proj,)),
                  (self.gate_up, (layer.mlp.gate_proj, layer.mlp.up_proj)), (None, (layer.mlp.down_proj,))]
        self.tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        self.plan = tuple(self._group(*g) for g in groups)
        self.constants = (layer.input_layernorm.variance_epsilon, attn.scaling, attn.head_dim)

    def _group(self, joined, products) -> Group:
        """One group of products of the same input, as the graph's plan says it (its tensors appended)."""
        together = isinstance(joined, JoinedInt4)
        if together:  # the eager step's joined kernel call, on the same joined blocks
            self.tensors += [joined.packed, joined.scales_and_zeros]
        adapters_joined = together and all(p.lora is not None for p in products)
        if adapters_joined:
            a, bs = adapter_copies(products, self.adapters)
            self.tensors.append(a)
        parts = []
        for i, p in enumerate(products):
            kind = "int4" if isinstance(p, Int4Linear) else "int8" if is_int8(p) else "float"
            if kind == "int4" and not together:
                self.tensors += [p.packed, p.scales_and_zeros]
            self.tensors += list(p.grouped) if kind == "int8" else [p.weight] if kind == "float" else []
            lora = kind == "int4" and p.lora is not None
            if lora and adapters_joined:
                self.tensors.append(bs[i])
            elif lora:
                own, (b,) = adapter_copies([p], self.adapters)
                self.tensors += [own, b]
            self.tensors += [] if p.bias is None else [p.bias]
            parts.append(Part(kind, p.out_features, lora, p.bias is not None))
        return Group(together, adapters_joined, tuple(parts))

    def __call__(self, x, span: Span, cache_layer):
        n = cache_layer.get_seq_length()
        buffers = None
        if x.shape[:2] == (1, 1) and n and self.graph.problem is None and torch.is_inference_mode_enabled():
            buffers = cache_layer.room(1)
        if buffers is not None and buffers[0].shape[0] == 1:
            # the first n + 1 positions of the buffers (positions outermost): contiguous whatever their capacity
            keys, values = buffers[0][0, : n + 1], buffers[1][0, : n + 1]
            cos, signed_sin = span.rotation()
            out = self.graph.run([x, cos, signed_sin, keys, values, *self.tensors])
            if out is not None:
                cache_layer.show(n + 1)
                return out
        return super().__call__(x, span, cache_layer)


def adapter_copies(products: list[Int4Linear], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The LoRA adapters of int4 products of one input as the graph reads them, in `dtype` (`adapter_dtype`): their
    A sides (A [rank, in]) side by side, and each one's B^T scaled [rank, out]. Made once per model (every decoding
    state makes its steps anew), as plain tensors; asked for another list with the same first product, it makes
    them anew."""
    loras, known = [p.lora for p in products], _ADAPTERS.get(products[0])
    if known is None or known[1] != dtype or len(known[0]) != len(loras) or any(
            a is not b for a, b in zip(known[0], loras)):
        with torch.inference_mode(False), torch.no_grad():
            copies = (torch.cat([a.t() for a, _ in loras]).to(dtype).contiguous(),
                      [b.to(dtype).contiguous() for _, b in loras])
        known = _ADAPTERS[products[0]] = loras, dtype, copies
    return known[2]


def adapter_dtype(sm: SortedModel) -> torch.dtype:
    """float16 if it holds every value of every int4 product's adapter exactly (the shipped adapter was saved in
    float16), else float32: one choice for the whole model, since the library's inputs, their dtypes included, must
    be the same in every layer. Half the bytes: with 4-bit weights the adapters (rank 16 on SmolLM2's seven
    products) are 29% of the blocks' bytes in float32 and took 2.7 of a 17.6 ms token on a Xeon (BENCHMARKS.md)."""
    if sm.model not in _ADAPTER_DTYPES:
        products = [m for layer in sm.layers for m in layer.modules() if isinstance(m, Int4Linear)]
        tensors = [t for m in products if m.lora is not None for t in m.lora]
        exact = all(torch.equal(t.to(torch.float16).float(), t) for t in tensors)
        _ADAPTER_DTYPES[sm.model] = torch.float16 if tensors and exact else torch.float32
    return _ADAPTER_DTYPES[sm.model]


def one_position(x, cos, signed_sin, keys, values, tensors, plan, eps: float, scaling: float, head_dim: int):
    """`LayerStep.__call__` for x [1, 1, H] at the last position of `keys`/`values` ([n + 1, kv_heads, head_dim],
    the layer's K/V buffers' first positions), whose K/V it writes there. `tensors`: the two norms' weights, then
    each product's as `plan` lists them (`CompiledStep._group`)."""
    t = iter(tensors)
    in_w, post_w = next(t), next(t)
    cos, signed_sin = cos.reshape(1, head_dim), signed_sin.reshape(1, head_dim)
    half = head_dim // 2
    h = rms_norm(x.reshape(1, -1), in_w, eps)
    query, key, value = products(h, plan[0], t)
    query, key = query.view(-1, head_dim), key.view(-1, head_dim)  # [heads, head_dim]
    query = query * cos + query.roll(half, -1) * signed_sin
    keys[-1] = key * cos + key.roll(half, -1) * signed_sin
    values[-1] = value.view(-1, head_dim)
    heads = lambda kv: kv.transpose(0, 1).unsqueeze(0)  # noqa: E731 ([1, kv_heads, n + 1, head_dim])
    out = F.scaled_dot_product_attention(query.view(1, -1, 1, head_dim), heads(keys), heads(values), scale=scaling,
                                         enable_gqa=keys.shape[1] != query.shape[0])
    x = x.reshape(1, -1) + products(out.reshape(1, -1), plan[1], t)[0]
    h = rms_norm(x, post_w, eps)
    gate, up = products(h, plan[2], t)
    return (x + products(F.silu(gate) * up, plan[3], t)[0]).view(1, 1, -1)


def products(x, group: tuple, t) -> list[torch.Tensor]:
    """The products of one input [1, in] in a group of the plan (`CompiledStep._group`), taking their tensors from
    the iterator `t`."""
    together, adapters_joined, parts = group
    if together:
        joined = block_product(x, next(t), next(t)).split([part.size for part in parts], dim=-1)
        if adapters_joined:  # every part's low-rank input in one reduction, over their A side by side
            low, start = linear(x, next(t), None, None).view(-1), 0
    outs = []
    for i, (kind, _, lora, bias) in enumerate(parts):
        if together:
            out = joined[i]
        elif kind == "int4":
            out = block_product(x, next(t), next(t))
        elif kind == "int8":
            out = linear(x, next(t), next(t), None)
        else:
            out = linear(x, next(t), None, None)
        if lora and adapters_joined:  # this part's B on its share of `low`
            b = next(t)
            out, start = out + raised(low[start : start + len(b)], b), start + len(b)
        elif lora:
            out = out + raised(linear(x, next(t), None, None).view(-1), next(t))
        outs.append(out + next(t) if bias else out)
    return outs


def linear(x, weight, scale, bias):
    """x [1, in] times weight [out, in]: float weights (of another dtype, such as an adapter's float16 copy, cast to
    x's in the product), or int8 ones with one scale per `GROUP` inputs (`scale` not None) dequantized in it.
    Written as the reduction inductor fuses into one kernel reading the weights once, not `F.linear`: on an AMD EPYC
    that kernel streamed float32 weights at 18-25 GB/s, the BLAS call (MKL's one-row product) at 8.5-10
    (BENCHMARKS.md); on an Intel Xeon with AMX, MKL's was the faster by 6% at 1 thread and 12% at 2 (all 30 layers:
    34.1 against 36.1 ms, 20.2 against 22.7), a smaller difference the other way (`benchmarks/engine_kernels.py`
    times both on the machine it runs on)."""
    weight = weight.to(x.dtype)
    if scale is not None:
        rows = weight.shape[0]
        weight = (weight.view(rows, -1, GROUP) * scale.unsqueeze(-1)).view(rows, -1)
    out = (x.unsqueeze(-2) * weight).sum(-1)
    return out if bias is None else out + bias


def raised(low, b):
    """A LoRA adapter's second product: its first (`linear` on A [rank, in], `adapter_copies`), [rank], through B^T
    scaled [rank, out]: [out], in float32 whatever B's dtype."""
    return (low.view(-1, 1) * b.float()).sum(0)


def rms_norm(x, weight, eps: float):
    """transformers' `LlamaRMSNorm`: in float32, scaled by the weight in the input's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _Graph(nn.Module):
    """`one_position` with the plan and constants fixed, for `torch.export`."""

    def __init__(self, graph: DecodeGraph):
        super().__init__()
        self.plan, self.constants = graph.plan, graph.constants

    def forward(self, x, cos, signed_sin, keys, values, tensors):
        return one_position(x, cos, signed_sin, keys, values, tensors, self.plan, *self.constants)


def layout(tensors: list[torch.Tensor]) -> tuple:
    """What a library takes its inputs to be: the shape, strides, dtype and device of each (it checks none of them
    when it runs: another layout would be read wrongly)."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device.type) for t in tensors)


def plain(layer: nn.Module) -> bool:
    """Whether `one_position` is this layer's computation as far as its parts tell: plain linear projections (or
    `--quantize`'s: grouped int8 weights, int4 blocks), LLaMA's RMSNorm (`variance_epsilon`, no offset), SiLU, no
    q/k norms. The warm-up's probe checks the numbers."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return (
        all(type(p) is nn.Linear or is_int8(p) and p.grouped is not None or isinstance(p, Int4Linear)
            for p in (getattr(m, n, None) for m, names in ((attn, "qkvo"), (mlp, ("gate", "up", "down")))
            for n in (f"{c}_proj" for c in names)))
        and all(type(norm).__name__ == "LlamaRMSNorm" for norm in norms)
        and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
        and getattr(attn, "q_norm", None) is None and getattr(attn, "k_norm", None) is None
    )


def with_compiled(sm: SortedModel, steps: list) -> list:
    """`steps` with the compiled step in place of each eager `LayerStep` of a plain layer whose inputs are the
    graph's (same plan and layout), once `compile_steps` compiled `sm` (and while its graph works); `steps` as they
    are otherwise."""
    graph = _GRAPHS.get(sm.model)
    if graph is None or graph.problem is not None:
        return steps
    for i, (step, layer) in enumerate(zip(steps, sm.layers)):
        if type(step) is LayerStep and plain(layer):
            compiled = CompiledStep(layer, graph, adapter_dtype(sm))
            if compiled.plan == graph.plan and layout(compiled.tensors) == graph.layout:
                steps[i] = compiled
    return steps


def compile_steps(sm: SortedModel, progress: Progress = quiet) -> str | None:
    """`--compile`: compile the decoding step of `sm` now (or load it from the cache folder), check it on a probe
    against the eager step, and use it in every `LayeredState` made afterwards. Returns None, or the one line
    saying why decoding stays eager."""
    if sm.num_layers == 0 or not plain(sm.layers[0]):
        problem = _PROBLEMS[sm.model] = ("--compile: this model's layers are not the kind the compiled step knows; "
                                         "decoding eagerly")
        return problem
    progress("compiling the decoding step", None)
    graph = _GRAPHS[sm.model] = DecodeGraph(CompiledStep(sm.layers[0], adapters=adapter_dtype(sm)))
    with _graph_products(sm):
        try:
            graph.loader()
        except Exception as exc:  # no C++ compiler, an operator export or inductor cannot take...
            graph.problem = f"--compile: the compiled step failed, decoding eagerly ({first_line(exc)})"
        apart = _probe(sm)
    problem = graph.problem
    # Fused kernels round differently; a computation that is not the layer's is off by its whole size.
    int4 = any(part.kind == "int4" for group in graph.plan for part in group.parts)
    tolerance = HALF_TOLERANCE if sm.dtype.itemsize < 4 else INT4_TOLERANCE if int4 else PROBE_TOLERANCE
    if problem is None and not apart <= tolerance:
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
def _probe(sm: SortedModel) -> float:
    """How far the compiled step is from the eager one: over every layer and three decoding positions after a
    two-token prompt, the largest difference of what the two write given the same input and K/V (the layer's
    update, output minus input, and the position's key and value), as a share of the eager one's norm (inf for a
    NaN). Layer by layer, so that roundings do not grow through the layers: on SmolLM2 a float32 sum in another
    order at one layer came out 7% apart 25 layers later, over the probe's special tokens (outsized activations).
    The residual stream is rounded at its own scale, which in half precision can exceed a layer's update: of an
    update's difference, what two ulps of each output element could make does not count."""
    from sortedchat.engine.state import LayeredState, LayerPass  # the state uses this module's steps

    state = LayeredState(sm)
    state.run(sm.num_layers, [1, 2])
    worst = 0.0
    for token in (3, 4, 5):
        layer_pass = LayerPass(state, sm.num_layers, [token])
        while (call := layer_pass.next_call()) is not None:
            i, x, span = call
            step, cache_layer = state.steps[i], state.cache.layers[i]
            if type(step) is not CompiledStep:  # a layer the graph does not take
                layer_pass.done(step(x, span, cache_layer))
                continue
            n = cache_layer.get_seq_length()
            written = _written(step(x, span, cache_layer), x, cache_layer, n)
            cache_layer.crop(-1)
            out = LayerStep.__call__(step, x, span, cache_layer)  # eager, on the same object
            reference = _written(out, x, cache_layer, n)
            unresolved = (2 * torch.finfo(x.dtype).eps * out.float().abs(), 0, 0)
            for a, b, floor in zip(written, reference, unresolved):
                apart = (((a - b).abs() - floor).clamp(min=0).norm() / b.norm().clamp(min=1e-30)).item()
                if math.isnan(apart):
                    return math.inf
                worst = max(worst, apart)
            layer_pass.done(out)
    return worst


def _written(out: torch.Tensor, x: torch.Tensor, cache_layer, n: int) -> list[torch.Tensor]:
    """What a step over x just wrote at position n, in float32: its update (output minus input), the key and the
    value (copies: the other step writes the same places)."""
    return [out.float() - x.float()] + [t[..., n, :].to(torch.float32, copy=True)
                                        for t in (cache_layer.keys, cache_layer.values)]
