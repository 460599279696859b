"""`--quantize int8`: a loaded model's matrix products in int8 on a CPU, the rest in float32.

On a CPU a decoding step is bound by the bytes of its weights: int8 weights are a quarter of float32's. The
kernel is torch's dynamic int8 linear (`torch.ao.nn.quantized.dynamic.Linear`: weights int8 per output channel,
symmetric; each call quantizes its input to 8 bits and multiplies in int8 with fbgemm or oneDNN, float32 out).
It was chosen by measurement among the maintained kernels (BENCHMARKS.md, issue 20): one position through
SmolLM2-135M's 210 layer products, 1 thread, 40 ms in float32, 19 ms with it, 58-113 ms with torchao's int8
configurations run eagerly (torchao is fast only inside `torch.compile`), 86 ms with bitsandbytes' CPU int8;
the LM head 8.8 ms in float32, 1.2 ms with it.

Quantized: the seven projections of every decoder layer, the shared LM head and per-exit own heads (ICT). A tied
head gets an int8 copy of its own: the embedding lookup stays float32. Left in float32: the embeddings, norms,
rotary and attention, the exit lenses (small, and `ExitLenses` reads their weights), and any projection an
unmerged PEFT adapter wraps (its LoRA product adds to the base layer's; such a layer goes through transformers'
call, as before). The engine's own layer step (`engine/layer_step.py`) runs the int8 products too.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig

from sortedchat import SortedChatError

KINDS = ("int8",)
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
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
        raise SortedChatError(f"--quantize {kind}: this build of torch has no quantized CPU kernels")


def quantize_model(sm, kind: str = "int8") -> None:
    """Replace `sm`'s layer products and heads by int8 ones, in place (module docstring). Everything is checked
    before anything changes: a model that cannot be quantized is refused in one line and left as it was."""
    check_request(kind, sm.device, sm.dtype, bitsandbytes=False)
    targets = [(layer, path, _checked(layer, path, f"layer {i}")) for i, layer in enumerate(sm.layers)
               for path in PROJECTIONS]
    targets.append((sm.model, "lm_head", _checked(sm.model, "lm_head", "the model")))
    if sm.exit_heads is not None:
        targets += [(sm.exit_heads.heads, key, _checked(sm.exit_heads.heads, key, "the exit heads"))
                    for key in list(sm.exit_heads.heads.keys())]
    with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated: the kernels are current
        warnings.simplefilter("ignore")
        for owner, path, module in targets:
            if type(module) is nn.Linear:
                parent, _, name = path.rpartition(".")
                setattr(owner.get_submodule(parent) if parent else owner, name, _int8(module))


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
    if isinstance(module, Int8Linear) or hasattr(module, "base_layer"):  # a PEFT tuner layer has its base_layer
        return module
    raise SortedChatError(f"--quantize: {where}'s {path} is a {type(module).__name__}, a layer type it does not "
                          "know (it quantizes torch Linear layers)")


def _int8(linear: nn.Linear) -> Int8Linear:
    linear.qconfig = per_channel_dynamic_qconfig
    return Int8Linear.from_float(linear)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_int8(module: nn.Module) -> bool:
    """Whether `module` is one of the int8 products `quantize_model` makes."""
    return isinstance(module, Int8Linear)


def int8_weights(model: nn.Module) -> int:
    """How many weights `model` holds in int8 (not counted by `parameters()`, which sees only float tensors);
    a tied head's int8 copy is not counted again (the embedding already is)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return sum(m.weight().numel() for m in model.modules()
               if is_int8(m) and not (tied and m is getattr(model, "lm_head", None)))


def describe(sm) -> str:
    """What is quantized, for `sortedchat info`."""
    layers = sum(is_int8(sm.layers[i].get_submodule(p)) for i in range(sm.num_layers) for p in PROJECTIONS
                 if _has(sm.layers[i], p))
    if not layers and not is_int8(sm.model.lm_head):
        bnb = any(type(m).__module__.startswith("bitsandbytes") for m in sm.model.modules())
        return "bitsandbytes (--load-in-4bit/--load-in-8bit)" if bnb else "none"
    parts = [f"{layers} of {sm.num_layers * len(PROJECTIONS)} layer products"]
    if is_int8(sm.model.lm_head):
        parts.append("the LM head")
    if sm.exit_heads is not None and any(is_int8(h) for h in sm.exit_heads.heads.values()):
        parts.append("the exit heads")
    return (f"int8 ({torch.backends.quantized.engine} dynamic): {', '.join(parts)}; embeddings, norms"
            + (", lenses" if sm.exit_lenses is not None else "") + " float32")


def _has(owner: nn.Module, path: str) -> bool:
    try:
        owner.get_submodule(path)
    except AttributeError:
        return False
    return True
