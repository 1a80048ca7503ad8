"""``surgery.cache``: the per-layer cache of converted layers inside transformers' ``Cache`` objects."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from surgery.cache import MixerCacheLayer, mixer_cache
from tests.models import tiny_config


def kv(B: int, T: int, fill: float = 0.0) -> torch.Tensor:
    return torch.arange(B * 2 * T * 3, dtype=torch.float32).view(B, 2, T, 3) + fill


def test_installs_into_a_config_cache_and_a_lazy_cache() -> None:
    cache = DynamicCache(config=tiny_config("llama"))
    layer = mixer_cache(cache, 1, window=4)
    assert cache.layers[1] is layer and isinstance(cache.layers[0], DynamicLayer)
    assert mixer_cache(cache, 1, window=4) is layer  # found again, not replaced
    lazy = DynamicCache()
    layer = mixer_cache(lazy, 2)
    assert len(lazy.layers) == 3 and lazy.layers[2] is layer
    assert all(type(x) is DynamicLayer for x in lazy.layers[:2])
    assert mixer_cache(None, 0) is None


def test_refuses_what_it_cannot_continue() -> None:
    cache = DynamicCache(config=tiny_config("llama"))
    cache.update(kv(1, 3), kv(1, 3), 0)
    with pytest.raises(ValueError, match="layer 0: the cache already holds 3 tokens"):
        mixer_cache(cache, 0)
    mixer_cache(cache, 1, window=2)
    with pytest.raises(ValueError, match="window is 2, the mixer needs 5"):
        mixer_cache(cache, 1, window=5)
    with pytest.raises(TypeError, match="transformers Cache"):
        mixer_cache(((kv(1, 1), kv(1, 1)),), 0)


def test_window_keeps_the_last_tokens_and_their_validity() -> None:
    layer = MixerCacheLayer(window=4)
    valid = torch.tensor([[True] * 3, [False, False, True]])
    k, v, ok = layer.window_with(kv(2, 3), kv(2, 3, 0.5), valid)
    assert k.shape[2] == 3 and ok is valid
    layer.commit(3, keys=k, values=v, valid=ok)
    k2, v2, ok2 = layer.window_with(kv(2, 2, 100), kv(2, 2, 100.5), None)
    assert torch.equal(k2, torch.cat([kv(2, 3), kv(2, 2, 100)], 2))
    assert ok2.tolist() == [[True] * 5, [False, False, True, True, True]]
    layer.commit(2, keys=k2, values=v2, valid=ok2)
    assert torch.equal(layer.keys, k2[:, :, -4:]) and torch.equal(layer.values, v2[:, :, -4:])
    assert layer.valid.tolist() == [[True] * 4, [False, True, True, True]]
    assert layer.get_seq_length() == 5  # tokens seen, not cached


def test_matches_dynamic_layer_for_masks_and_lengths() -> None:
    ours, theirs = MixerCacheLayer(window=2), DynamicLayer()
    for T in (5, 1, 1, 3):
        k = kv(1, T)
        ours.update(k, k)
        theirs.update(k, k)
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
    assert ours.get_max_length() == -1 and ours.keys.shape[2] == 2


def test_batch_edits_apply_to_states_and_window() -> None:
    layer = MixerCacheLayer(window=3)
    states = (torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone(),)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 3, 3).clone()
    layer.commit(3, states=states, keys=k, values=k.clone(), valid=torch.ones(3, 3, dtype=torch.bool))

    def rows() -> list[float]:
        got = [layer.states[0][:, 0, 0, 0], layer.keys[:, 0, 0, 0], layer.values[:, 0, 0, 0]]
        assert all(torch.equal(g, got[0]) for g in got) and layer.valid.shape[0] == got[0].shape[0]
        return got[0].tolist()

    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert rows() == [2.0, 0.0, 0.0]
    layer.batch_select_indices(torch.tensor([0, 1]))
    assert rows() == [2.0, 0.0]
    layer.batch_repeat_interleave(2)
    assert rows() == [2.0, 2.0, 0.0, 0.0]
    layer.reset()
    assert layer.states is None and layer.keys is None and layer.get_seq_length() == 0


def test_crop_is_refused_except_for_nothing() -> None:
    layer = MixerCacheLayer()
    layer.crop(0)
    with pytest.raises(ValueError, match="cannot crop -2 tokens"):
        layer.crop(-2)
    assert not layer.is_croppable and not layer.is_sliding
