"""What sortedchat relies on inside transformers beyond its public model API, in one place.

The engine drives decoder layers itself, so it depends on parts of transformers that no release promises to keep:
  * the model's parts (`REQUIRED_PARTS`, `check_architecture`): embeddings, the layer stack, the final norm, the
    rotary module and the LM head, at LLaMA's attribute paths;
  * a decoder layer's keyword for its cache (`cache_keyword`): renamed in 5.24;
  * `DynamicLayer`'s internals (`GrowingLayer`): `keys`/`values` tensors, `is_initialized`,
    `lazy_initialization`, `get_seq_length`, and `crop` slicing them;
  * the attention module's internals (`kv_projection`, and `engine/layer_step.py`, which runs a layer's operators
    itself and checks them bit for bit against the layer on a probe before using them): `input_layernorm`,
    `k_proj`/`v_proj`, `head_dim`, an optional `k_norm`, and the modelling module's `apply_rotary_pos_emb`
    (`rotary_function`, found in the module that defines the attention class).
pyproject.toml pins the transformers range the tests run on (`<5.25`). Whoever moves the pin re-checks this file
with its tests: tests/test_propagate.py (kv_projection against the layer's own K/V, the cache keyword),
tests/test_layer_step.py (the engine's own layer step against transformers'), tests/test_engine.py and
tests/test_head_and_cache.py (GrowingLayer in decoding and crop), tests/test_loading.py (check_architecture).
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicLayer

from sortedchat import SortedChatError

# The attribute paths every supported decoder exposes (Llama, Mistral, Qwen2/3, SmolLM, ...).
REQUIRED_PARTS = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")


def check_architecture(model: nn.Module) -> None:
    """Refuse models whose HF class lacks the layer stack we drive ourselves, naming the class."""
    missing = []
    for path in REQUIRED_PARTS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is None:
            missing.append(path)
    if missing:
        raise SortedChatError(
            f"{type(model).__name__} is not supported: it has no {', '.join(missing)} "
            "(sortedchat needs a LLaMA-style decoder: model.layers, model.norm, lm_head)"
        )


CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


@functools.cache
def cache_keyword(layer_class: type) -> str:
    """The keyword `layer_class.forward` takes its `Cache` by (the signature under transformers' deprecation
    wrapper, which `inspect` follows)."""
    params = inspect.signature(layer_class.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise SortedChatError(f"{layer_class.__name__}.forward takes no KV cache as {' or '.join(CACHE_KEYWORDS)} "
                          f"(transformers {transformers.__version__}); sortedchat supports the range in its "
                          "package requirements")


def rotary_function(attn: nn.Module):
    """The modelling module's `apply_rotary_pos_emb` for this attention class, or None (not a LLaMA-style one)."""
    return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)


def kv_projection(layer, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
    """The K/V a decoder layer stores for `hidden` [1, q, H] at the positions of `position_embeddings`, computed
    as the layer's attention does before attending (transformers' Llama/Qwen attention): input norm, k/v
    projections, the k-norm of models that have one, rotary on K. Nothing else of the layer runs."""
    attn = layer.self_attn
    rotary = rotary_function(attn)
    if rotary is None:
        raise SortedChatError(f"{type(attn).__name__} has no rotary function sortedchat knows: propagated K/V "
                              "needs a LLaMA-style attention (use --kv exact)")
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(x).view(shape)
    k_norm = getattr(attn, "k_norm", None)
    if k_norm is not None:
        keys = k_norm(keys)
    keys, values = keys.transpose(1, 2), attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    return rotary(keys[:, :0], keys, cos, sin)[1], values  # a query with no heads: only K is rotated


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that writes each token's K/V into a buffer instead of concatenating.

    `DynamicLayer.update` copies the layer's whole cache on every call (`torch.cat`): at a few hundred
    positions that is a few percent of a CPU decoding step (BENCHMARKS.md). Here `keys`/`values` are views of
    the first positions of a buffer whose capacity doubles when full, so a step writes only its own
    positions. `crop` is still `DynamicLayer`'s slice, a view of the same buffer, and the next update
    overwrites what was cropped.

    The buffers hold positions outermost ([batch, capacity, kv heads, head dim]; `keys`/`values` are their
    [batch, kv heads, n, head dim] views): the first n positions of a sequence are then one contiguous block
    whatever the capacity, which the compiled step (`engine/compiled.py`) needs, its graph being compiled ahead of
    time for one layout of its inputs. Attention reads the views as they are (SDPA gives the same bits on them as
    on contiguous K/V)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers = None
        n, q = self.get_seq_length(), key_states.shape[-2]
        buffers = self.room(q)
        if buffers is None:
            capacity = max(64, 2 * (n + q))
            b, heads, _, dim = key_states.shape
            buffers = tuple(new.new_empty((b, capacity, heads, dim)) for new in (key_states, value_states))
            if n:
                buffers[0][:, :n] = self.keys.transpose(1, 2)
                buffers[1][:, :n] = self.values.transpose(1, 2)
            self._buffers = buffers
        buffers[0][:, n : n + q] = key_states.transpose(1, 2)
        buffers[1][:, n : n + q] = value_states.transpose(1, 2)
        self.show(n + q)
        return self.keys, self.values

    def show(self, n: int) -> None:
        """Let `keys`/`values` be the buffers' first n positions (after something wrote them there)."""
        self.keys, self.values = (t[:, :n].transpose(1, 2) for t in self._buffers)

    def room(self, q: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (keys, values) buffers if they take q more positions in place, else None: `update` rebuilds them when
        full, when something replaced keys/values with tensors of their own, or when buffers made under inference
        mode are written outside it (torch forbids that in place). The compiled step (`engine/compiled.py`) writes
        into them itself."""
        buffers = getattr(self, "_buffers", None)
        n = self.get_seq_length()
        if (
            buffers is None
            or n + q > buffers[0].shape[1]
            or (n and (self.keys.data_ptr(), self.values.data_ptr()) != (buffers[0].data_ptr(), buffers[1].data_ptr()))
            or (buffers[0].is_inference() and not torch.is_inference_mode_enabled())
        ):
            return None
        return buffers
