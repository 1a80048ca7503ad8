"""Generation cache for converted layers: recurrent states and a sliding window of keys and values.

``generate()`` hands every layer one ``transformers`` ``Cache`` (usually a ``DynamicCache`` whose layers are
``DynamicLayer`` objects sized for softmax attention). A converted layer swaps its own slot for a ``MixerCacheLayer``
the first time it runs (``mixer_cache``); softmax layers that a plan keeps still use their ``DynamicLayer``.

A ``MixerCacheLayer`` holds, per sequence of the batch:

- the recurrent state(s), fp32, one per key/value head (``[B, Hkv, K, V]``; GSA keeps two);
- the last ``window`` post-RoPE keys and values ``[B, Hkv, W, D]`` and their validity ``[B, W]`` (False for left
  padding), for the sliding-window branch;
- the number of tokens seen, which is what ``get_seq_length`` returns (models derive positions from it);
- ``aux``: named per-sequence tensors of constant size that a window branch keeps besides its window (attention
  sinks, a sparse retrieval memory; ``surgery.window``), batch dim first, edited with everything else.

Memory is constant in the sequence length. The official Liger code kept no window at all, so at decode its
sliding-window branch saw only the current token, and it counted heads instead of tokens (liger.md section 6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

State = tuple[Tensor, ...]


class MixerCacheLayer(CacheLayerMixin):
    """One converted layer's cache: recurrent states, a key/value window, and the token count.

    Mixers read ``states``, ``keys``, ``values``, ``valid`` and ``seen``, build the window for this call with
    ``window_with``, and store everything with one ``commit`` per forward (which also counts the tokens).

    Args:
        window: how many past keys/values to keep (0: none, for purely recurrent mixers).
    """

    is_sliding = False  # transformers sizes the full-attention mask from the first non-sliding layer: be that one
    is_compileable = False
    is_croppable = False  # a recurrent state cannot be rolled back token by token
    supports_early_init = False  # installed by the mixer after the cache exists; never pre-allocated
    #: Buffers at fixed addresses, updated in place (``surgery.static_cache``): a window of exactly ``window`` slots
    #: with its ``valid`` ``[B, W]``, which a mixer may update in place itself (then it commits without keys).
    static = False

    def __init__(self, window: int = 0) -> None:
        super().__init__()
        if window < 0:
            raise ValueError(f"MixerCacheLayer window must be >= 0, got {window}")
        self.window = window
        self.states: State | None = None
        self.valid: Tensor | None = None  # [B, W] bool; None = every cached key is a real token
        self.seen = 0
        self.device: torch.device | None = None
        self.aux: dict[str, Tensor] = {}  # constant-size extras of a window branch (sinks, memory), [B, ...]

    def __repr__(self) -> str:
        shapes = [tuple(s.shape) for s in self.states] if self.states is not None else None
        return f"MixerCacheLayer(window={self.window}, seen={self.seen}, states={shapes})"

    # -- what mixers call ---------------------------------------------------------------------------------

    def window_with(
        self, keys: Tensor, values: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The cached window followed by this call's tokens (nothing is stored).

        Args:
            keys: ``[B, Hkv, T, D]`` post-RoPE keys of this call.
            values: ``[B, Hkv, T, D]``.
            valid: ``[B, T]`` bool (False for padding) or None when every token is real.

        Returns:
            keys and values ``[B, Hkv, W' + T, D]`` (W' <= window cached tokens), validity ``[B, W' + T]`` or None.
        """
        if self.keys is None:
            return keys, values, valid
        k = torch.cat([self.keys, keys], dim=2)
        v = torch.cat([self.values, values], dim=2)
        if self.valid is None and valid is None:
            return k, v, None
        B, T, W = keys.shape[0], keys.shape[2], self.keys.shape[2]
        old = self.valid if self.valid is not None else keys.new_ones(B, W, dtype=torch.bool)
        new = valid if valid is not None else keys.new_ones(B, T, dtype=torch.bool)
        return k, v, torch.cat([old, new.to(torch.bool)], dim=1)

    def commit(
        self,
        num_tokens: int,
        states: State | None = None,
        keys: Tensor | None = None,
        values: Tensor | None = None,
        valid: Tensor | None = None,
        aux: dict[str, Tensor] | None = None,
    ) -> None:
        """Store this call's results and count its ``num_tokens`` tokens.

        Args:
            num_tokens: tokens this forward processed (padding included: positions count them too).
            states: the recurrent state(s) after the last token, e.g. ``([B, Hkv, K, V],)``.
            keys, values: ``[B, Hkv, S, D]``, typically ``window_with``'s output; only the last ``window`` are kept.
            valid: ``[B, S]`` bool or None.
            aux: tensors that replace the stored ``aux`` entries of the same names (constant size, batch first).
        """
        if aux:
            self.aux.update(aux)
        if states is not None:
            self.states = tuple(states)
            self.device = states[0].device
        if keys is not None and values is not None and self.window > 0:
            # clone: a slice would keep the whole (growing) concatenation alive
            self.keys = keys[:, :, -self.window :].clone()
            self.values = values[:, :, -self.window :].clone()
            self.valid = None if valid is None else valid[:, -self.window :].clone()
            self.device = keys.device
        self.seen += num_tokens
        self.is_initialized = True

    def bind(self, layer_idx: int, window: int) -> None:
        """Called by ``mixer_cache`` on every use: the mixer says which window it needs (the cache contract).

        A layer built by someone else (a static cache allocated before the mixers ran) may adopt it here.
        """
        if self.window != window:
            raise ValueError(f"layer {layer_idx}: cache window is {self.window}, the mixer needs {window}")

    # -- the transformers layer protocol ------------------------------------------------------------------

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Softmax-attention protocol: append ``[B, Hkv, T, D]`` keys/values; returns the window plus them."""
        k, v, valid = self.window_with(key_states, value_states, None)
        self.commit(key_states.shape[2], keys=k, values=v, valid=valid)
        return k, v

    def get_seq_length(self) -> int:
        """Tokens seen so far (not heads, not the window length)."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Same as DynamicLayer: softmax layers a plan keeps get their masks sized from the first such layer,
        # which may be this one (transformers picks the first non-sliding layer).
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _tensors(self) -> list[str]:
        return [n for n in ("keys", "values", "valid") if getattr(self, n) is not None]

    def _map(self, fn: Any) -> None:
        """Apply ``fn`` to every stored tensor (batch-dim edits, device moves)."""
        if self.states is not None:
            self.states = tuple(fn(s) for s in self.states)
        for name in self._tensors():
            setattr(self, name, fn(getattr(self, name)))
        self.aux = {name: fn(t) for name, t in self.aux.items()}

    def reset(self) -> None:
        self.states = self.keys = self.values = self.valid = None
        self.seen = 0
        self.aux = {}
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                f"cannot crop {tokens_to_remove} tokens from a recurrent layer cache: its state has no per-token "
                "history (assisted decoding with rollback is not supported for converted layers)"
            )

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))


def mixer_cache(cache: Any, layer_idx: int, window: int = 0) -> MixerCacheLayer | None:
    """This layer's ``MixerCacheLayer`` inside ``cache``, installed on first use; None when ``cache`` is None.

    Args:
        cache: the ``transformers`` ``Cache`` of the forward (``DynamicCache`` from ``generate()``), or None.
        layer_idx: the layer's index in the model (its slot in ``cache.layers``).
        window: keys/values to keep for a sliding-window branch (0: none).
    """
    if cache is None:
        return None
    if not isinstance(cache, Cache):
        raise TypeError(
            f"layer {layer_idx}: converted layers need a transformers Cache object (e.g. DynamicCache), "
            f"got {type(cache).__name__}"
        )
    layers = cache.layers
    if len(layers) <= layer_idx:
        if cache.layer_class_to_replicate is None:
            raise ValueError(f"layer {layer_idx}: the cache has only {len(layers)} layers")
        # A lazily grown DynamicCache: fill the slots of earlier layers with what they would get anyway.
        while len(layers) < layer_idx:
            layers.append(cache.layer_class_to_replicate())
        layers.append(MixerCacheLayer(window))
        return layers[layer_idx]
    layer = layers[layer_idx]
    if isinstance(layer, MixerCacheLayer):
        layer.bind(layer_idx, window)
        return layer
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        raise ValueError(
            f"layer {layer_idx}: the cache already holds {layer.get_seq_length()} tokens of softmax attention "
            f"({type(layer).__name__}); a converted layer cannot continue from them"
        )
    layers[layer_idx] = MixerCacheLayer(window)
    return layers[layer_idx]
