"""How a decoder layer takes its KV cache, in every transformers version the project supports.

The engine runs decoder layers one at a time, so it depends on their keyword for the cache, which
transformers renamed: up to 5.23 `forward(..., past_key_values=...)`; from 5.24 `cache=...`, where the
old name still works but warns ("will be removed in version 5.40.0"). Reading the name from the layer's
own signature (once per layer class) calls each version the way it expects, and 5.40 as well.
"""

from __future__ import annotations

import functools
import inspect

from sortedchat import SortedChatError

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


@functools.cache
def cache_keyword(layer_class: type) -> str:
    """The keyword `layer_class.forward` takes its `Cache` by (the signature under transformers' deprecation
    wrapper, which `inspect` follows)."""
    params = inspect.signature(layer_class.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    import transformers

    raise SortedChatError(f"{layer_class.__name__}.forward takes no KV cache as {' or '.join(CACHE_KEYWORDS)} "
                          f"(transformers {transformers.__version__}); sortedchat supports the range in its "
                          "package requirements")
