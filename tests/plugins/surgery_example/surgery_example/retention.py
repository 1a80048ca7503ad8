"""A third-party recurrent mixer in one module, on surgery's public base: retention with a fixed decay per head.

    S_t = gamma S_{t-1} + k_t^T v_t,    o_t = (q_t / sqrt(D)) S_t,    y = o_proj(o)

Only the formula (``gla_form``: the inputs of one GLA call) is written here; projections, cache, padding and the Liger branch come from ``RecurrentMixer``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from surgery.testing import GLAForm, RecurrentMixer, identity_on_padding


class Retention(RecurrentMixer):
    """Retention (RetNet-like): one fixed decay ``gamma`` for every head and dimension."""

    name = "retention"
    description = "retention with a fixed decay (a test recurrent mixer)"
    default_weights = "copy_qkvo"
    test_options = ({}, {"gamma": 0.5})

    class Options(RecurrentMixer.Options):
        gamma: float = Field(0.9, gt=0, lt=1)

    def gla_form(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, valid: Tensor | None) -> GLAForm:
        # One GLA call: the base turns it into recur (and Liger Attention can fuse it with its window on a GPU).
        gk = torch.full_like(k, math.log(self.options.gamma), dtype=torch.float32)
        kf, gk = identity_on_padding(valid, k.float(), gk)
        return q.float() / math.sqrt(q.shape[-1]), kf, v.float(), gk, None
