"""A static decode cache: every tensor allocated once for a batch size, updated in place, so that one decode step
has fixed shapes and fixed addresses and can be captured as a CUDA graph (``surgery.generate``).

Per layer of the model:

- a converted layer gets a ``StaticMixerLayer``: its recurrent state(s) and its sliding window of post-RoPE keys and
  values ``[B, Hkv, W, D]`` with their validity ``[B, W]`` (False: never written, or left padding);
- a kept softmax layer (full attention) gets a ``StaticKVLayer``: keys and values ``[B, Hkv, L, D]`` up to a maximum
  length L, their validity ``[B, L]`` and a per-row write position ``[B]``.

The cache contract (what a mixer must do to be captured; every built-in mixer does it):

1. take its layer cache with ``mixer_cache(ctx.cache, layer_idx, window)`` (the window is declared there, and a
   static layer adopts it on first use) and store everything with one ``commit`` per forward;
2. keep states as a tuple of tensors whose first dim is the batch and whose shapes do not depend on the number of
   tokens; an all-zero state means "no history" (a fresh or reset row starts from zeros, not from None);
3. at one token per sequence, run without host synchronisation or data-dependent shapes. A mixer that cannot sets
   ``Mixer.capturable = False`` and is decoded eagerly over the same cache.

Buffers are allocated by the first forward that commits into them (the prefill), from the shapes the mixer hands
over: nothing is declared twice, and a plugin mixer gets a static cache without writing a spec. After that, a
commit whose shapes differ raises ``StaticCacheError``. The window is a shift buffer, kept in time order (oldest
first), like the dynamic ``MixerCacheLayer``: a commit rewrites it with one copy (2 MB per layer for Llama-3-8B at
batch 8, window 64), which costs the same memory traffic as concatenating a ring buffer for attention, and window
code that cares about order (soft-capped bands, sinks) sees what it sees in eager decoding.

Rows are independent slots (``reset_rows``, ``load_row``): a sequence can be dropped and another prefilled into its
row without touching the others, the basis of continuous batching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from surgery.cache import MixerCacheLayer, State
from surgery.errors import StaticCacheError

__all__ = ["StaticCacheError", "StaticDecodeCache", "StaticKVLayer", "StaticMixerLayer", "layer_kinds",
           "not_capturable"]  # fmt: skip


def _rows(rows: int | Sequence[int] | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor([rows] if isinstance(rows, int) else rows, dtype=torch.long, device=device)


class StaticMixerLayer(MixerCacheLayer):
    """A converted layer's cache in static buffers: states ``[B, ...]``, window ``[B, Hkv, W, D]``, validity ``[B, W]``.

    Args:
        batch_size: rows (slots) of the cache.
        layer_idx: the layer's index (for messages).
    """

    static = True

    def __init__(self, batch_size: int, layer_idx: int) -> None:
        super().__init__(0)
        self.window: int | None = None  # type: ignore[assignment]  # adopted from the mixer (bind)
        self.batch_size = batch_size
        self.layer_idx = layer_idx
        self.frozen_seen: int | None = None  # set while a captured step runs: get_seq_length must not change
        self.mask_length: int | None = None  # the kept layers' length, when the model keeps any

    def __repr__(self) -> str:
        shapes = [tuple(s.shape) for s in self.states] if self.states is not None else None
        return f"StaticMixerLayer(layer={self.layer_idx}, window={self.window}, seen={self.seen}, states={shapes})"

    def bind(self, layer_idx: int, window: int) -> None:
        if self.window is None:
            self.window = window
            return
        super().bind(layer_idx, window)

    @property
    def allocated(self) -> bool:
        return self.states is not None or self.keys is not None

    def _check(self, what: str, got: Tensor, buf: Tensor) -> None:
        if got.shape != buf.shape:
            raise StaticCacheError(
                f"layer {self.layer_idx}: {what} of shape {tuple(got.shape)} does not fit the static buffer "
                f"{tuple(buf.shape)} (a static cache needs states whose shapes do not depend on the input)"
            )

    def _alloc_states(self, states: State) -> None:
        for s in states:
            if s.shape[0] != self.batch_size:
                raise StaticCacheError(
                    f"layer {self.layer_idx}: state batch {s.shape[0]} != static cache batch {self.batch_size}"
                )
        self.states = tuple(torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in states)
        self.device = states[0].device

    def _alloc_window(self, keys: Tensor, values: Tensor) -> None:
        B, H, _, D = keys.shape
        if B != self.batch_size:
            raise StaticCacheError(f"layer {self.layer_idx}: batch {B} != static cache batch {self.batch_size}")
        W = int(self.window or 0)
        self.keys = keys.new_zeros(B, H, W, D)
        self.values = values.new_zeros(B, values.shape[1], W, values.shape[3])
        self.valid = torch.zeros(B, W, dtype=torch.bool, device=keys.device)
        self.device = keys.device

    def commit(
        self,
        num_tokens: int,
        states: State | None = None,
        keys: Tensor | None = None,
        values: Tensor | None = None,
        valid: Tensor | None = None,
        aux: dict[str, Tensor] | None = None,
    ) -> None:
        """Copy this call's results into the static buffers (allocated by the first call); ``aux`` (a window
        branch's constant-size extras, e.g. attention sinks) likewise, by name."""
        for name, t in (aux or {}).items():
            buf = self.aux.get(name)
            if buf is None:
                self.aux[name] = t.clone()  # the prefill sizes it; later calls copy in place
            else:
                self._check(f"aux '{name}'", t, buf)
                buf.copy_(t)
        if states is not None:
            if self.states is None:
                self._alloc_states(tuple(states))
            if len(states) != len(self.states):
                raise StaticCacheError(f"layer {self.layer_idx}: {len(states)} states, the cache holds "
                                       f"{len(self.states)}")  # fmt: skip
            for buf, s in zip(self.states, states):
                self._check("a state", s, buf)
                buf.copy_(s)
        if keys is not None and values is not None and self.window:
            if self.keys is None:
                self._alloc_window(keys, values)
            W, S = self.keys.shape[2], keys.shape[2]
            n = min(W, S)
            self.keys[:, :, W - n :].copy_(keys[:, :, S - n :])
            self.values[:, :, W - n :].copy_(values[:, :, S - n :])
            if valid is None:
                self.valid[:, W - n :].fill_(True)
            else:
                self.valid[:, W - n :].copy_(valid[:, S - n :])
        if self.frozen_seen is None:
            self.seen += num_tokens
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen if self.frozen_seen is None else self.frozen_seen

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        # transformers sizes the masks of kept layers from the first non-sliding layer, which may be this one
        if self.mask_length is not None:
            return self.mask_length, 0
        q = query_length if isinstance(query_length, int) else 1
        return self.get_seq_length() + q, 0

    # -- slots ------------------------------------------------------------------------------------------------

    def reset_rows(self, rows: Tensor) -> None:
        """Forget rows ``rows`` ``[R]`` (long): zero states, empty window."""
        if self.states is not None:
            for s in self.states:
                s.index_fill_(0, rows, 0)
        if self.valid is not None:
            self.valid.index_fill_(0, rows, False)
        for t in self.aux.values():  # sinks: a refilled slot collects its own
            t.index_fill_(0, rows, 0)

    def load_row(self, row: int, src: MixerCacheLayer, src_row: int = 0) -> None:
        """Put row ``src_row`` of a dynamic layer cache (e.g. a batch-1 prefill) into row ``row``."""
        if src.states is not None:
            if self.states is None:
                self._alloc_states(tuple(s.new_zeros(self.batch_size, *s.shape[1:]) for s in src.states))
            for buf, s in zip(self.states, src.states):
                self._check("a state row", s[src_row], buf[row])
                buf[row].copy_(s[src_row])
        if self.window and src.keys is not None:
            if self.keys is None:
                k, v = src.keys, src.values
                self._alloc_window(k.new_zeros(self.batch_size, *k.shape[1:]), v.new_zeros(self.batch_size, *v.shape[1:]))
            W, S = self.keys.shape[2], src.keys.shape[2]
            n = min(W, S)
            self.keys[row, :, W - n :].copy_(src.keys[src_row, :, S - n :])
            self.values[row, :, W - n :].copy_(src.values[src_row, :, S - n :])
            self.valid[row].fill_(False)
            if src.valid is None:
                self.valid[row, W - n :].fill_(True)
            else:
                self.valid[row, W - n :].copy_(src.valid[src_row, S - n :])
        for name, t in src.aux.items():  # sinks, a retrieval memory: constant-size, batch first
            buf = self.aux.get(name)
            if buf is None:
                buf = self.aux[name] = t.new_zeros(self.batch_size, *t.shape[1:])
            self._check(f"aux '{name}' row", t[src_row], buf[row])
            buf[row].copy_(t[src_row])
        self.seen = max(self.seen, src.seen)
        self.is_initialized = True

    def tensors(self) -> list[Tensor]:
        """Every buffer: states, window, and the ``aux`` extras (all zero: no history)."""
        return [*(self.states or ()), *(t for t in (self.keys, self.values, self.valid) if t is not None),
                *self.aux.values()]  # fmt: skip

    def reset(self) -> None:
        """Zero everything in place (addresses stay, so a captured graph stays valid)."""
        for t in self.tensors():
            t.zero_()
        self.seen = 0

    def _refuse(self, what: str) -> None:
        raise StaticCacheError(f"layer {self.layer_idx}: a static cache cannot {what} (its buffers have fixed "
                               "addresses); use a DynamicCache")  # fmt: skip

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.tensors():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._refuse("change its batch size")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            self._refuse("change its batch size")

    def offload(self) -> None:
        self._refuse("be offloaded")


class StaticKVLayer(CacheLayerMixin):
    """A kept softmax layer's keys and values in static buffers ``[B, Hkv, L, D]``, written at per-row positions.

    ``update`` writes the T new keys of row b at columns ``pos[b] .. pos[b] + T - 1``. Within ``generate()``
    (every row advanced together) column j is cache position j, as in transformers' ``StaticLayer``, so its masks
    apply; ``surgery.generate`` builds its own decode mask from ``valid`` and ``pos``, which also holds for rows
    refilled at different lengths.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, batch_size: int, max_length: int, layer_idx: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.max_length = max_length
        self.layer_idx = layer_idx
        self.valid: Tensor | None = None  # [B, L] bool
        self.pos: Tensor | None = None  # [B] long: columns written per row
        self.seen = 0
        self.frozen_seen: int | None = None
        self.device: torch.device | None = None

    def __repr__(self) -> str:
        return f"StaticKVLayer(layer={self.layer_idx}, max_length={self.max_length}, seen={self.seen})"

    @property
    def allocated(self) -> bool:
        return self.keys is not None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, _, D = key_states.shape
        if B != self.batch_size:
            raise StaticCacheError(f"layer {self.layer_idx}: batch {B} != static cache batch {self.batch_size}")
        L, dev = self.max_length, key_states.device
        self.keys = key_states.new_zeros(B, H, L, D)
        self.values = value_states.new_zeros(B, value_states.shape[1], L, value_states.shape[3])
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.arange = torch.arange(L, device=dev)
        self.device = dev
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Write ``[B, Hkv, T, D]`` keys/values at each row's position; return the whole buffers."""
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        B, H, T, D = key_states.shape
        if self.frozen_seen is None:
            if self.seen + T > self.max_length:
                raise StaticCacheError(f"layer {self.layer_idx}: {self.seen + T} tokens exceed the static cache's "
                                       f"max_length {self.max_length}")  # fmt: skip
            self.seen += T
        idx = self.pos[:, None] + self.arange[:T]  # [B, T]
        self.keys.scatter_(2, idx[:, None, :, None].expand(B, H, T, D), key_states.to(self.keys.dtype))
        Dv = value_states.shape[3]
        self.values.scatter_(2, idx[:, None, :, None].expand(B, H, T, Dv), value_states.to(self.values.dtype))
        self.valid.scatter_(1, idx, True)
        self.pos.add_(T)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen if self.frozen_seen is None else self.frozen_seen

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        return self.max_length, 0

    def get_max_length(self) -> int:
        return self.max_length

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.keys, self.values, self.valid, self.pos) if t is not None]

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
        self.seen = 0

    def reset_rows(self, rows: Tensor) -> None:
        if self.valid is not None:
            self.valid.index_fill_(0, rows, False)
            self.pos.index_fill_(0, rows, 0)

    def load_row(self, row: int, src: Any, src_row: int = 0, valid: Tensor | None = None) -> None:
        """Put row ``src_row`` of a dynamic layer (keys ``[b, Hkv, S, D]``) into row ``row``; ``valid`` ``[S]``."""
        k, v = src.keys, src.values
        S = k.shape[2]
        if S > self.max_length:
            raise StaticCacheError(f"layer {self.layer_idx}: {S} tokens exceed max_length {self.max_length}")
        if self.keys is None:
            self.lazy_initialization(k.new_zeros(self.batch_size, *k.shape[1:]), v.new_zeros(self.batch_size, *v.shape[1:]))
        self.keys[row, :, :S].copy_(k[src_row])
        self.values[row, :, :S].copy_(v[src_row])
        self.valid[row].fill_(False)
        self.valid[row, :S].copy_(valid if valid is not None else torch.ones(S, dtype=torch.bool))
        self.pos[row] = S
        self.seen = max(self.seen, S)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.tensors():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise StaticCacheError("a static decode cache cannot be cropped")

    def offload(self) -> None:
        raise StaticCacheError("a static decode cache cannot be offloaded")

    def prefetch(self) -> None:
        pass


def _top_mixers(model: nn.Module) -> dict[int, Any]:
    """The mixer of each converted layer (a branch such as Liger's recurrent mixer is not a layer)."""
    from surgery.mixer import Mixer

    found: dict[int, Any] = {}
    for _, m in model.named_modules():  # pre-order: a parent mixer comes before its branches
        if isinstance(m, Mixer) and m.layer_idx not in found:
            found[m.layer_idx] = m
    return found


def _sliding(config: Any, i: int) -> bool:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[i] != "full_attention"
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def layer_kinds(model: nn.Module) -> list[str]:
    """Per layer: ``"mixer"`` (a converted layer), ``"kv"`` (kept full softmax attention) or ``"sliding"`` (kept
    sliding-window softmax attention, which the static cache does not hold). A mixer that keeps a key/value cache
    (``Mixer.keeps_kv_cache``, the identity mixer) counts as a kept layer."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    mixers = _top_mixers(model)
    kinds = []
    for i in range(config.num_hidden_layers):
        m = mixers.get(i)
        if m is not None and not m.keeps_kv_cache:
            kinds.append("mixer")
        else:
            kinds.append("sliding" if _sliding(config, i) else "kv")
    return kinds


def not_capturable(model: nn.Module) -> list[str]:
    """Names of the mixer classes in ``model`` (branches included) that declare ``capturable = False``."""
    from surgery.mixer import Mixer

    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, Mixer) and not m.capturable})


class StaticDecodeCache(Cache):
    """One static layer per model layer, for ``batch_size`` rows; pass it to ``model(...)`` or ``model.generate``.

    Args:
        model: a converted model (``surgery.convert`` / ``surgery.load``); unconverted layers are kept softmax layers.
        batch_size: rows (slots).
        max_length: columns of a kept softmax layer's keys/values (prompt + new tokens); needed only when the model
            keeps softmax layers. Converted layers have no length limit.

    Raises:
        StaticCacheError: a kept layer uses a sliding window, or kept layers exist and ``max_length`` is None.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_length: int | None = None) -> None:
        kinds = layer_kinds(model)
        if "sliding" in kinds:
            bad = [i for i, k in enumerate(kinds) if k == "sliding"]
            raise StaticCacheError(f"layers {bad} keep sliding-window softmax attention, which the static decode "
                                   "cache does not hold; decode with a DynamicCache")  # fmt: skip
        if "kv" in kinds and max_length is None:
            kept = [i for i, k in enumerate(kinds) if k == "kv"]
            raise StaticCacheError(f"layers {kept} keep softmax attention: give the static cache a max_length "
                                   "(prompt + new tokens)")  # fmt: skip
        layers: list[Any] = [StaticMixerLayer(batch_size, i) if k == "mixer" else
                             StaticKVLayer(batch_size, int(max_length or 0), i) for i, k in enumerate(kinds)]  # fmt: skip
        for layer in layers:
            if isinstance(layer, StaticMixerLayer) and "kv" in kinds:
                layer.mask_length = max_length
        super().__init__(layers=layers)
        self.rows = batch_size
        self.length_limit = max_length
        self.kinds = kinds

    @property
    def kv_layers(self) -> list[StaticKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, StaticKVLayer)]

    @property
    def allocated(self) -> bool:
        """Whether every layer has its buffers (after the first forward or ``load_row``)."""
        return all(layer.allocated for layer in self.layers)

    def tensors(self) -> Iterator[Tensor]:
        for layer in self.layers:
            yield from layer.tensors()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # -- capture support ---------------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Fix every layer's ``get_seq_length`` (nothing on the host may change inside a captured step)."""
        for layer in self.layers:
            layer.frozen_seen = layer.seen

    def unfreeze(self, steps: int) -> None:
        """End a captured run of ``steps`` one-token steps: the host counters catch up."""
        for layer in self.layers:
            if layer.frozen_seen is not None:
                layer.seen = layer.frozen_seen + steps
                layer.frozen_seen = None

    def decode_mask(self, dtype: torch.dtype) -> Tensor | None:
        """Additive ``[B, 1, 1, L]`` mask for kept layers at one new token per row: the row's valid columns and the
        column it writes now. None when no layer is kept. Every op runs on the device (capturable)."""
        kv = self.kv_layers
        if not kv or kv[0].valid is None:
            return None
        layer = kv[0]
        ok = layer.valid | (layer.arange[None, :] == layer.pos[:, None])
        mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    # -- slots --------------------------------------------------------------------------------------------------

    def mark_padding(self, attention_mask: Tensor) -> None:
        """After a left-padded prefill through this cache: padding columns of kept layers are not valid."""
        T = attention_mask.shape[1]
        for layer in self.kv_layers:
            if layer.valid is not None:
                layer.valid[:, :T] &= attention_mask.to(device=layer.valid.device, dtype=torch.bool)

    def reset_rows(self, rows: int | Sequence[int] | Tensor) -> None:
        """Forget rows (slots) ``rows``; other rows are untouched."""
        for layer in self.layers:
            if layer.allocated:
                layer.reset_rows(_rows(rows, layer.device))

    def load_row(self, row: int, src: Cache, src_row: int = 0, valid: Tensor | None = None) -> None:
        """Fill row ``row`` from row ``src_row`` of a dynamic cache (a prefill of one sequence).

        Args:
            valid: ``[S]`` bool, the source row's real tokens (False: padding), for kept layers; None: all real.
        """
        if len(src.layers) != len(self.layers):
            raise StaticCacheError(f"source cache has {len(src.layers)} layers, this one {len(self.layers)}")
        for layer, s in zip(self.layers, src.layers):
            if isinstance(layer, StaticMixerLayer):
                if not isinstance(s, MixerCacheLayer):
                    raise StaticCacheError(f"layer {layer.layer_idx}: source layer is {type(s).__name__}")
                layer.load_row(row, s, src_row)
            else:
                layer.load_row(row, s, src_row, valid)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
