"""`--quantize int4`: a decoder layer's matrix products with 4-bit weights on a CPU, an adapter kept beside them.

On a CPU a decoding step is bound by the bytes of its weights, and 4-bit blocks are an eighth of float32's. The
default model's layers come from a Q4_1 GGUF: converted to float32 they are such blocks exactly, so the blocks
are found again as they were (their codes exactly; their scales and minimums to bfloat16, below), where merging
the shipped SoFT adapter into them (what float32 loading does) would move the weights off the blocks. So
`--quantize int4` loads an adapter unmerged and keeps it beside the blocks in float32 (`Int4Linear.lora`), as the
issue that asked for it put it (issue 20); only the bfloat16 copies that prompts use (`DENSE_ROWS`) carry it merged.

The kernel is torch's own CPU int4 product (`_weight_int4pack_mm_for_cpu`, the one torchao's CPU int4 layout
calls), chosen by measurement: on the Xeon of 2026-12-02, one position through a 1536 x 576 product, 1 thread, 53
us against float32 `F.linear`'s 129 us; its float32-input path is a slow reference (1.5 ms), so inputs go in as
bfloat16 (its only fast path) and the output comes back float32; that path takes the blocks' scales and minimums
in bfloat16 too (a weight moves by at most about 0.2%). Those roundings, and the prompts' copies rounded to
bfloat16, are the only loss on the default model: teacher-forced full depth agrees with float32 on 99.2% of
held-out response tokens, and 98.7% on the compiled decoding path (BENCHMARKS.md).

With `--compile` the same blocks and adapters run inside the compiled step (`engine/compiled.py`), where the
code around the kernel, which eagerly costs about as much as the kernel itself, is fused away.

Weights that are not 4-bit blocks (any other model) are rounded to them, llama.cpp's way (each block of 32 inputs
spans its minimum to its maximum in 16 steps); `Int4Linear.exact` says which were blocks already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sortedchat import SortedChatError

GROUP = 32  # inputs per 4-bit block (llama.cpp's Q4_0/Q4_1 blocks hold 32)
ROWS = 16  # the kernel packs outputs (weight rows) in multiples of this
# From this many positions on (a prompt, `eval`'s sequences), a product runs on a bfloat16 copy of its 4-bit
# weights, its adapter merged into the copy, a layer's joined products as one (where `joined` finds that this gives
# each its own numbers): the kernel's cost grows with every position it takes (it is made for decoding), a dense
# product's far less. One 1536 x 576 product, 1 thread, AMD EPYC 2026-12-02: 4 positions 0.19 ms in the kernel
# against 0.33 ms dense, 16 positions 1.18 against 0.53, 100 positions 1.8 against 0.8; a 119-token prompt's first
# token 523 -> 280 ms at 1 thread, 330 -> 253 ms at 2 (`benchmarks/first_token.py`, one run; others moved by up to
# a quarter).
DENSE_ROWS = 8
DENSE_LIMIT = 1 << 30  # bytes of bfloat16 copies a model may keep (SmolLM2-135M: 212 MB); past it, prompts run 4-bit


class Int4Linear(nn.Module):
    """An `nn.Linear` with 4-bit weights in blocks of `GROUP` inputs, each block with its own scale and minimum
    (llama.cpp's Q4_1 layout: w = q * scale + min, q in 0..15), multiplied by torch's CPU int4 kernel on bfloat16
    inputs, float32 out. `lora`: a LoRA adapter's (A, B * scaling), kept beside the 4-bit base and added in float32
    (merged into `dense`, the bfloat16 copy for `DENSE_ROWS` rows or more).

    A GGUF's Q4_1 weights, converted to float32, are such blocks exactly: quantizing them again finds the same
    blocks (`exact`), so the products lose only the bfloat16 rounding of the blocks' scales and minimums and of the
    inputs and outputs, and the adapter that merging would have blurred into the blocks keeps its float32 weights."""

    def __init__(self, linear: nn.Linear, lora: tuple[torch.Tensor, torch.Tensor] | None = None,
                 dense: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale, low = q4_blocks(w)
        # a GGUF's scales are float16: the float32 one found here may be an ulp off it, the blocks the same
        self.exact = any(torch.equal((q * s[..., None] + low[..., None]).reshape(w.shape), w)
                         for s in (scale, scale.half().float()))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.reshape(w.shape).to(torch.int32), 1))
        # the kernel's dequantization is (q - 8) * scale + zero, per block: zero = min + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1)
                             .to(torch.bfloat16).contiguous())
        self.bias = None if linear.bias is None else linear.bias.detach()
        # (A transposed [in, rank], B transposed and scaled [rank, out]): two plain products, no transposing per call
        self.lora = None if lora is None else (lora[0].detach().t().contiguous(), lora[1].detach().t().contiguous())
        # for `DENSE_ROWS`+ rows: the weights as the kernel dequantizes them (bfloat16 scales), the adapter merged,
        # rounded to bfloat16 (a plain attribute, not a buffer: CPU only, not saved, not moved by `.to()`; 2 bytes a
        # weight more)
        self.dense = None
        if dense:
            sz = self.scales_and_zeros.float()
            merged = ((q.float() - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).reshape(w.shape)
            if self.lora is not None:
                merged += (self.lora[0] @ self.lora[1]).t()
            self.dense = merged.to(torch.bfloat16)
        # `joined`'s decision for this product and the next ones of its input: (the products, JoinedInt4 or None)
        self.joined: tuple[list, JoinedInt4 | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.dense is not None and len(flat) >= DENSE_ROWS:
            out = dense_product(flat, self.dense, self.bias).to(x.dtype)
        else:
            out = self.finish(block_product(flat, self.packed, self.scales_and_zeros).to(x.dtype), flat)
        return out.view(*x.shape[:-1], self.out_features)

    def finish(self, out: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The block product `out` [rows, out_features] (float32) with the adapter's product and the bias added.
        (Not joined with other products' adapters: MKL splits one position's product by its width and the thread
        count, so the last bits would differ from this product's own call.)"""
        if self.lora is not None:
            out = with_adapter(out, flat, *self.lora)
        return out if self.bias is None else out + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The 4-bit weight dequantized as the kernel dequantizes it (its float32 path on an identity input),
        adapter excluded."""
        eye = torch.eye(self.in_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scales_and_zeros.float()).t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4"
                + (f", LoRA rank {self.lora[0].shape[1]}" if self.lora is not None else ""))


class JoinedInt4:
    """Several `Int4Linear`s of the same input (a layer's q/k/v projections; its gate/up) as one kernel call over
    their rows side by side, then each one's adapter and bias as its own call would add them: the same numbers as
    calling each (`joined` checks), with fewer calls, which on a CPU decoding one position cost about half as much
    as the kernel's own work (issue 20: SmolLM2's 30 layers, one position, 1 thread, 26.4 ms apart, 21.7 joined).
    Prompts: one product over the parts' bfloat16 copies side by side (`dense`), or, where `joined` found that this
    rounds otherwise than each part's own (`dense` None), each part's."""

    def __init__(self, parts: list[Int4Linear]):
        self.parts = parts
        self.in_features = parts[0].in_features
        self.packed = torch.cat([p.packed for p in parts])
        self.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], dim=1).contiguous()
        ends = torch.tensor([p.out_features for p in parts]).cumsum(0).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends))
        self.dense = torch.cat([p.dense for p in parts]) if all(p.dense is not None for p in parts) else None
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
        self.bias = torch.cat(biases) if any(p.bias is not None for p in parts) else None

    def share(self) -> None:
        """Let the parts' weights be views of the joined ones (one copy in memory, not two)."""
        for p, (lo, hi) in zip(self.parts, self.bounds):
            p.packed = self.packed[lo:hi]
            if self.dense is not None:
                p.dense = self.dense[lo:hi]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat = x.reshape(-1, self.in_features)
        if len(flat) >= DENSE_ROWS and any(p.dense is not None for p in self.parts):  # the copies, adapters merged
            if self.dense is None:  # side by side they did not give each part's own numbers (`joined`)
                return [p(x) for p in self.parts]
            out = dense_product(flat, self.dense, self.bias).to(x.dtype)
            return [out[:, lo:hi].view(*x.shape[:-1], hi - lo) for lo, hi in self.bounds]
        out = block_product(flat, self.packed, self.scales_and_zeros).to(x.dtype)
        return [p.finish(out[:, lo:hi], flat).view(*x.shape[:-1], hi - lo)
                for p, (lo, hi) in zip(self.parts, self.bounds)]


def block_product(flat: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 kernel over rows [rows, in] on packed 4-bit blocks: bfloat16 inputs (its fast path), float32
    out. (`engine/compiled.py`'s graph calls it too.)"""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16).contiguous(), packed, GROUP,
                                                      scales_and_zeros).float()


def dense_product(flat: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Rows [rows, in] through a bfloat16 copy of 4-bit weights with their adapter merged (`Int4Linear.dense`),
    float32 out."""
    out = F.linear(flat.to(torch.bfloat16), dense).float()
    return out if bias is None else out + bias


def with_adapter(out: torch.Tensor, flat: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`out` plus a LoRA adapter's product on `flat`: (flat @ A^T) @ (B^T scaled), two small products."""
    return torch.addmm(out, flat @ a, b)


def joined(products: list[nn.Module]):
    """`products` (of the same input) as one call returning each one's output: a `JoinedInt4` where all are int4
    products and it gives what each gives on a probe, bit for bit, else calls of each in turn. (The kernel packs
    rows in groups of 64 and a smaller remainder apart: side by side, parts of other sizes are packed otherwise
    than alone, which the probe finds.)"""
    each = lambda x: [p(x) for p in products]  # noqa: E731 (the fallback, a function as the joined one is)
    if len(products) < 2 or not all(isinstance(p, Int4Linear) for p in products):
        return each
    known = products[0].joined  # every decoding state makes its steps anew: decide once
    if known is not None and known[0] == products:
        return known[1] or each
    # made outside inference mode (steps are made inside it): the parts' buffers must stay ordinary tensors
    with torch.inference_mode(False):
        together = JoinedInt4(products)
    g = torch.Generator().manual_seed(0)
    # decoding; a few positions through the kernel; prompts on the bfloat16 copies
    probes = [torch.randn(rows, products[0].in_features, generator=g) for rows in (1, 3, DENSE_ROWS, 64)]
    with torch.inference_mode():
        same = all(torch.equal(a, b) for probe in probes[:2] for a, b in zip(together(probe), each(probe)))
        if same and together.dense is not None and not all(
                torch.equal(a, b) for probe in probes[2:] for a, b in zip(together(probe), each(probe))):
            together.dense = None  # side by side the copies round otherwise: each part's own product for prompts
    if same:
        together.share()
    products[0].joined = (list(products), together if same else None)
    return together if same else each


def q4_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [out, in / GROUP, GROUP] in 0..15 as uint8, scale and min [out, in / GROUP]): each block of `GROUP`
    inputs of a row spans min..min + 15 * scale, as llama.cpp's Q4_1 quantizes it."""
    blocks = w.reshape(w.shape[0], -1, GROUP)
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
    scale = (high - low) / 15
    q = torch.round((blocks - low[..., None]) / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    return q.clamp(0, 15).to(torch.uint8), scale, low


def int4_of(module: nn.Module, where: str, dense: bool = False) -> nn.Module:
    """`module` (a torch Linear, or a PEFT LoRA layer wrapping one) as an `Int4Linear` (`dense`: with its bfloat16
    copy for prompts), or the line naming why it cannot be one."""
    if isinstance(module, Int4Linear):
        return module
    base, lora = module, None
    if hasattr(module, "base_layer"):  # a PEFT LoRA layer: one plain adapter, kept unmerged beside the blocks
        base = module.base_layer
        active = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
        if (len(active) > 1 or module.merged or getattr(module, "lora_variant", {}) or type(base) is not nn.Linear
                or any(getattr(module, "lora_bias", {}).get(a) for a in active)):
            raise SortedChatError(f"--quantize int4: {where} holds an adapter it cannot keep beside 4-bit weights "
                                  "(one plain, unmerged LoRA adapter on a torch Linear is what it keeps)")
        if active:
            name = active[0]
            lora = (module.lora_A[name].weight.float(), module.lora_B[name].weight.float() * module.scaling[name])
    if type(base) is not nn.Linear:
        raise SortedChatError(f"--quantize int4: {where} is a {type(base).__name__}, not a torch Linear")
    if base.in_features % GROUP:
        raise SortedChatError(f"--quantize int4: {where} has {base.in_features} inputs, not a multiple of the "
                              f"{GROUP} a 4-bit block holds")
    if base.out_features % ROWS:
        raise SortedChatError(f"--quantize int4: {where} has {base.out_features} outputs, not a multiple of the "
                              f"{ROWS} torch's int4 kernel packs together")
    return Int4Linear(base, lora, dense)


def describe(sm, projections: int) -> str:
    """What `--quantize int4` made of `sm`, for `sortedchat info` (`projections`: a layer's that it quantizes)."""
    products = [m for layer in sm.layers for m in layer.modules() if isinstance(m, Int4Linear)]
    exact, adapted = sum(m.exact for m in products), sum(m.lora is not None for m in products)
    parts = [f"{len(products)} of {sm.num_layers * projections} layer products in 4-bit blocks of {GROUP} "
             f"(bfloat16 inputs and scales; {exact} of them the loaded weights' own blocks" + (", the rest rounded" if
                                                                                exact < len(products) else "") + ")"]
    copies = any(m.dense is not None for m in products)
    if copies:
        parts.append(f"prompts of {DENSE_ROWS} positions or more on bfloat16 copies of them")
    if adapted:
        parts.append(f"a LoRA adapter kept beside {adapted} of them in float32"
                     + (" (merged into the prompts' copies)" if copies else ""))
    return f"int4: {'; '.join(parts)}; LM head, embeddings, norms" + (", lenses" if sm.exit_lenses is not None
                                                                      else "") + " float32"
