"""`--quantize int8|int4`: a loaded model's matrix products in int8 (here) or int4 (`sortedchat.int4`) on a CPU, the
rest in float32.

On a CPU a decoding step is bound by the bytes of its weights: int8 weights are a quarter of float32's. Weights
are int8 per output channel (symmetric), inputs are quantized to 8 bits per position, products run in int8 and
come back float32 (`Int8Linear`). One position (decoding) goes through torch's dynamic int8 linear
(`torch.ops.quantized.linear_dynamic`, fbgemm or oneDNN), which was chosen by measurement among the maintained
kernels (BENCHMARKS.md, issue 20): one position through SmolLM2-135M's 210 layer products, 1 thread, 40 ms in
float32, 19 ms with it, 58-113 ms with torchao's int8 configurations run eagerly (torchao is fast only inside
`torch.compile`), 86 ms with bitsandbytes' CPU int8; the LM head 8.8 ms in float32, 1.2 ms with it. Its packed
weights are made from a quantized tensor, which torch 2.13 marks deprecated (a warning, silenced here): when they
go, `torch._int_mm` can serve one position too (measured about 1.6x the dynamic kernel's time). Several
positions (a prompt, a speculative verification, `eval`) go through `torch._int_mm` with one input scale per
position: the dynamic kernel has one per call, and on SmolLM2 that costs half of the agreement with float32 when
a call holds whole sequences (BENCHMARKS.md: 48.8% against 90.2%).

Quantized: the seven projections of every decoder layer, the shared LM head and per-exit own heads (ICT). A tied
head gets an int8 copy of its own: the embedding lookup stays float32. Left in float32: the embeddings, norms,
rotary and attention, the exit lenses (small, and `ExitLenses` reads their weights), and any projection an
unmerged PEFT adapter wraps (its LoRA product adds to the base layer's; such a layer goes through transformers'
call, as before). The engine's own layer step (`engine/layer_step.py`) runs the int8 products too.

The two kernels round a position's input differently (asymmetric, per call; symmetric, per position), so a
speculative verification (several positions in one call) may pick another token than full depth one position at a
time would, where float32 picks the same.

With `--compile`, decoding runs the layers' products inside the compiled graph (`engine/compiled.py`) instead:
int8 weights with one scale per `GROUP` inputs of a row (symmetric), float32 inputs, dequantized in the graph,
which inductor fuses into the product (BENCHMARKS.md, issue 20: SmolLM2-135M's 210 layer products, 1 thread,
compiled, 2.2x float32's speed, about the dynamic kernel's; teacher-forced agreement of full depth with float32,
the layers alone int8, 98.3% against 96.8% with one scale per output channel). The layers' `Int8Linear`s keep
these weights too (`grouped`); the eager paths use the per-channel ones.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from sortedchat import SortedChatError, int4
from sortedchat.int4 import Int4Linear, int4_of

KINDS = ("int8", "int4")
GROUP = 32  # inputs per scale of the compiled graph's int8 weights (`Int8Linear.grouped`)
# The projections of a LLaMA-family decoder layer, by the attribute paths `LayerStep` and transformers use.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def check_request(kind: str, device: torch.device, dtype: torch.dtype, bitsandbytes: bool) -> None:
    """`--quantize KIND` against the other load options, before any weight loads."""
    if kind not in KINDS:
        raise SortedChatError(f"--quantize: {kind!r} is not one of {', '.join(KINDS)}")
    if bitsandbytes:
        raise SortedChatError("--quantize and --load-in-4bit/--load-in-8bit exclude each other")
    if device.type != "cpu":
        raise SortedChatError(f"--quantize {kind} is for CPUs: the model would load on {device.type} "
                              "(add --device cpu)")
    if dtype != torch.float32:
        raise SortedChatError(f"--quantize {kind} quantizes float32 weights: --dtype {_name(dtype)} asked for "
                              "(use --dtype float32 or auto)")
    if kind == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise SortedChatError(f"--quantize int4: this build of torch ({torch.__version__}) has no CPU int4 kernel")
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
        raise SortedChatError(f"--quantize {kind}: this build of torch has no quantized CPU kernels")


def quantize_model(sm, kind: str = "int8", grouped: bool = False) -> None:
    """Replace `sm`'s layer products and heads by int8 ones, or its layer products by int4 ones, in place (module
    docstrings). Everything is checked before anything changes: a model that cannot be quantized is refused in one
    line and left as it was. `grouped` (with `--compile` only: about 120 MB more on SmolLM2) also keeps the layers'
    weights grouped for the compiled graph."""
    check_request(kind, sm.device, sm.dtype, bitsandbytes=False)
    if kind == "int4":
        return _quantize_int4(sm)
    targets = _layer_targets(sm)
    targets.append((sm.model, "lm_head", _checked(sm.model, "lm_head", "the model")))
    if sm.exit_heads is not None:
        targets += [(sm.exit_heads.heads, key, _checked(sm.exit_heads.heads, key, "the exit heads"))
                    for key in list(sm.exit_heads.heads.keys())]
    for owner, path, module in targets:
        if type(module) is nn.Linear:
            parent, _, name = path.rpartition(".")
            tied = module.weight is sm.model.model.embed_tokens.weight
            setattr(owner.get_submodule(parent) if parent else owner, name,
                    Int8Linear(module, module.weight if tied else None, grouped=grouped and path in PROJECTIONS))


def _quantize_int4(sm) -> None:
    """The layers' projections as `Int4Linear`s, a PEFT LoRA layer's base with its adapter beside it, each with a
    bfloat16 copy for prompts while those copies stay within `int4.DENSE_LIMIT`; the heads stay as they are (the LM
    head's product has its own screen, `head_product`)."""
    targets = _layer_targets(sm)
    weights = sum(getattr(_base(m), "in_features", 0) * getattr(_base(m), "out_features", 0) for _, _, m in targets)
    dense = 2 * weights <= int4.DENSE_LIMIT
    replacements = [(owner, path, int4_of(module, f"layer {i // len(PROJECTIONS)}'s {path}", dense))
                    for i, (owner, path, module) in enumerate(targets)]
    for owner, path, module in replacements:
        parent, _, name = path.rpartition(".")
        setattr(owner.get_submodule(parent), name, module)


def _base(module: nn.Module) -> nn.Module:
    """The product a PEFT layer wraps, or `module` itself."""
    return getattr(module, "base_layer", module)


def _layer_targets(sm) -> list[tuple[nn.Module, str, nn.Module]]:
    """(layer, projection path, the module there, checked) for every projection of every layer."""
    return [(layer, path, _checked(layer, path, f"layer {i}")) for i, layer in enumerate(sm.layers)
            for path in PROJECTIONS]


def _checked(owner: nn.Module, path: str, where: str) -> nn.Module:
    """The module at `path`, if it is one `quantize_model` knows: a float32 CPU Linear (quantized), an int8 one
    already, or a PEFT layer wrapping one (left as it is); otherwise the line naming why not."""
    try:
        module = owner.get_submodule(path)
    except AttributeError:
        raise SortedChatError(f"--quantize: {where} ({type(owner).__name__}) has no {path}: a layer type it does "
                              "not know (it quantizes LLaMA-family layers)") from None
    if type(module) is nn.Linear:
        w = module.weight
        if w.dtype != torch.float32 or w.device.type != "cpu":
            raise SortedChatError(f"--quantize: {where}'s {path} is {_name(w.dtype)} on {w.device.type}, "
                                  "not float32 on the CPU")
        return module
    if is_quantized(module) or hasattr(module, "base_layer"):  # a PEFT tuner layer has its base_layer
        return module
    raise SortedChatError(f"--quantize: {where}'s {path} is a {type(module).__name__}, a layer type it does not "
                          "know (it quantizes torch Linear layers)")


class Int8Linear(nn.Module):
    """An `nn.Linear` with int8 weights (per output channel, symmetric) and int8 products, float32 in and out;
    `grouped`: the weights again, one scale per `GROUP` inputs, for the compiled graph (a layer's products), or None."""

    def __init__(self, linear: nn.Linear, float_weight: torch.Tensor | None = None, grouped: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self._weight = float_weight  # `weight`, where a float32 copy is kept anyway (a tied head's: the embedding)
        scale = row_scales(w)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self._packed = prepacked(w, scale, self.bias)
        self._full_range = full_range_is_exact()
        self.grouped = group_quantized(w) if grouped and self.in_features % GROUP == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1:  # one position: the dynamic kernel (its one scale per call is the position's own)
            return torch.ops.quantized.linear_dynamic(x, self._packed, reduce_range=not self._full_range)
        flat = x.reshape(rows, x.shape[-1])
        x_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        out = torch._int_mm(torch.round(flat / x_scale).to(torch.int8), self.qweight.t()) * (x_scale * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight, for code that reads a Linear's rows (the candidate-set confidence measure reads a
        few of the head's): the kept one, or the int8 one dequantized, made on first use."""
        if self._weight is None:
            self._weight = self.qweight.float() * self.scale[:, None]
        return self._weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def group_quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights [out, in], float32 scales [out, in / GROUP]): symmetric, one scale per `GROUP` inputs of a row.
    Off from the float32 weights by half the relative error of one scale per row on SmolLM2 (BENCHMARKS.md)."""
    blocks = w.reshape(w.shape[0], -1, GROUP)
    scale = blocks.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(blocks / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """One symmetric int8 scale per row of `w` [out, in]: its largest magnitude maps to 127."""
    return w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127


def prepacked(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """`w` [out, in] in int8 with one `scale` per row (symmetric), packed for torch's dynamic int8 kernel. (torch
    warns that the quantized tensor this goes through is deprecated: the kernels are current, so it is silenced.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0,
                                               torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, bias)


@functools.cache
def full_range_is_exact() -> bool:
    """Whether the dynamic kernel multiplies 8-bit inputs without saturating on this CPU. Kernels without VNNI
    sum pairs of u8 x s8 products in int16, which 255 * 127 * 2 overflows: torch then quantizes inputs to 7 bits
    (`reduce_range`), at twice the rounding error. Measured on the worst case, not assumed from the CPU's name."""
    w = torch.full((8, 64), 1.0)
    x = torch.full((1, 64), 1.0)
    x[0, 0] = -1.0  # the input's range spans 0..255 after its zero point: every other entry maps to 255
    out = torch.ops.quantized.linear_dynamic(x, prepacked(w, torch.full((8,), 1 / 127)), reduce_range=False)
    return bool(torch.allclose(out, x @ w.t(), rtol=0.02))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_int8(module: nn.Module) -> bool:
    """Whether `module` is one of the int8 products `quantize_model` makes."""
    return isinstance(module, Int8Linear)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is one of the products `quantize_model` makes (int8 or int4)."""
    return isinstance(module, (Int8Linear, Int4Linear))


def quantized_weights(model: nn.Module) -> int:
    """How many weights `model` holds in int8 or int4 (not counted by `parameters()`, which sees only float
    tensors); a tied head's int8 copy is not counted again (the embedding already is)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return sum(m.in_features * m.out_features for m in model.modules()
               if is_quantized(m) and not (tied and m is getattr(model, "lm_head", None)))


def weight_count(module: nn.Module) -> int:
    """The weights of `module`, its int8 products' included (their weights are buffers, not parameters)."""
    return (sum(p.numel() for p in module.parameters())
            + sum(m.in_features * m.out_features for m in module.modules() if is_quantized(m)))


def kind(sm) -> str:
    """How `sm`'s weights are quantized: "int8" or "int4" (`quantize_model`), "bitsandbytes" or "none"."""
    for m in sm.model.modules():
        if is_quantized(m):
            return "int8" if is_int8(m) else "int4"
    return "bitsandbytes" if any(type(m).__module__.startswith("bitsandbytes") for m in sm.model.modules()) else "none"


def describe(sm) -> str:
    """What is quantized, for `sortedchat info`."""
    if kind(sm) == "int4":
        return int4.describe(sm, len(PROJECTIONS))
    if kind(sm) != "int8":
        return {"bitsandbytes": "bitsandbytes (--load-in-4bit/--load-in-8bit)"}.get(kind(sm), "none")
    layers = sum(is_int8(sm.layers[i].get_submodule(p)) for i in range(sm.num_layers) for p in PROJECTIONS
                 if _has(sm.layers[i], p))
    parts = [f"{layers} of {sm.num_layers * len(PROJECTIONS)} layer products"]
    if is_int8(sm.model.lm_head):
        parts.append("the LM head")
    if sm.exit_heads is not None and any(is_int8(h) for h in sm.exit_heads.heads.values()):
        parts.append("the exit heads")
    bits = "8" if full_range_is_exact() else "7"
    return (f"int8 (one position: {torch.backends.quantized.engine} dynamic, {bits}-bit inputs): {', '.join(parts)}; "
            "embeddings, norms"
            + (", lenses" if sm.exit_lenses is not None else "") + " float32")


def _has(owner: nn.Module, path: str) -> bool:
    try:
        owner.get_submodule(path)
    except AttributeError:
        return False
    return True
