"""Whole-model decoding over the static cache, the decode step captured as a CUDA graph.

A converted model's decode state has a constant size, so one decode step (every layer, the LM head and the greedy
choice of the next token) has fixed shapes and fixed addresses: ``Decoder`` captures it once and replays it per
token, which removes the launch and Python overhead that dominates eager decoding (about 1 ms per layer on an H200
at batch 8, against 0.1 ms of weight reads). Eager decoding over the same cache stays the reference.

Capture modes (``capture=``):

- ``"graph"`` (default on CUDA): ``torch.cuda.CUDAGraph`` around the eager step. Nothing is traced, so every mixer
  that keeps the cache contract (``surgery.static_cache``) is captured as it runs eagerly, Triton kernels included.
- ``"compile"``: ``torch.compile(mode="reduce-overhead")``: inductor fuses the elementwise work between the matmuls
  and cudagraph trees replay it; costs a compilation per batch size and depends on dynamo tracing the mixers.
- ``"eager"``: no capture (the CPU path, and the fallback: a mixer with ``capturable = False``, or a capture that
  fails, is decoded eagerly over the same cache with a warning).

Prefill runs the model once over the prompt through the static cache (chunked kernels; the final states land in
the static buffers by ``commit``); the decode steps follow. Left-padded batches are exact: positions count real
tokens, padding never enters a state or a window. Rows are slots: ``Decoder.reset_slot`` / ``fill_slot`` replace
one sequence without touching the others.

Entry points: ``generate(model, input_ids, ...)``, ``model.generate(..., custom_generate=surgery.generate.
custom_generate)``, ``model.generate(..., cache=StaticDecodeCache(model, batch))`` (eager, HF's loop), and the CLI
``surgery generate RUN_DIR --prompt ...``.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from surgery.static_cache import StaticDecodeCache, not_capturable

__all__ = ["CAPTURE_MODES", "Decoder", "GenerateResult", "cache_kwarg", "custom_generate", "generate"]

CAPTURE_MODES = ("graph", "compile", "eager")

logger = logging.getLogger(__name__)


def cache_kwarg(model: nn.Module) -> str:
    """The keyword the model's forward takes its cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def padded_positions(attention_mask: Tensor) -> Tensor:
    """``[B, T]`` position ids of a left-padded batch: real tokens count from 0, padding gets 1 (ignored)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill_(attention_mask == 0, 1)


class Decoder:
    """A static cache for ``batch_size`` rows and a (captured) greedy decode step over it.

    Args:
        model: a converted model in eval mode.
        batch_size: rows (slots).
        max_length: prompt + new tokens; bounds kept softmax layers only (converted layers have no limit).
        capture: ``"graph"``, ``"compile"`` or ``"eager"`` (see the module docstring); on CPU always eager.
        compile_backend: inductor by default; tests pass ``"eager"`` to check tracing without a compiler.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_length: int | None = None, capture: str = "graph",
                 compile_backend: str | None = None) -> None:  # fmt: skip
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache = StaticDecodeCache(model, batch_size, max_length)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache_kw = cache_kwarg(model)
        self.mode = self._resolve(capture, compile_backend)
        self.compile_backend = compile_backend
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # the step's input token
        self.pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # its position (real tokens)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # the step's output token
        self.logits: Tensor | None = None  # [B, V], the step's last logits
        self._graph: Any = None
        self._compiled: Callable[[], None] | None = None
        self._frozen_steps: int | None = None  # steps taken since the cache was frozen
        self.steps = 0
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _resolve(self, capture: str, compile_backend: str | None) -> str:
        if capture == "eager":
            return "eager"
        if capture == "graph" and self.device.type != "cuda":
            return "eager"  # CUDA graphs need CUDA; the same static cache decodes eagerly
        if capture == "compile" and self.device.type != "cuda" and compile_backend is None:
            return "eager"
        bad = not_capturable(self.model)
        if bad:
            warnings.warn(f"mixers {bad} declare capturable = False: decoding eagerly over the static cache",
                          stacklevel=3)  # fmt: skip
            return "eager"
        return capture

    # -- the step -------------------------------------------------------------------------------------------------

    def _forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        kwargs[self.cache_kw] = self.cache
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=input_ids, use_cache=True, **kwargs).logits[:, -1]

    def _step_body(self) -> None:
        """One token for every row: read ``ids``/``pos``, write ``tokens``/``logits``, advance. Capturable."""
        kwargs: dict[str, Any] = {"position_ids": self.pos}
        mask = self.cache.decode_mask(self.dtype)
        if mask is not None:
            kwargs["attention_mask"] = mask
        logits = self._forward(self.ids, **kwargs)
        nxt = logits.argmax(-1)
        self.tokens.copy_(nxt)
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)
        self.logits.copy_(logits)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Run the prompts ``[B, T]`` (left-padded where ``attention_mask`` ``[B, T]`` is 0) through the static cache.

        Returns the first new token of every row ``[B]`` (a view of ``tokens``: copy it to keep it).
        """
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"prefill: {B} prompts for a decoder of batch size {self.batch_size}")
        if self.max_length is not None and self.cache.kv_layers and T >= self.max_length:
            raise ValueError(f"prefill: a prompt of {T} tokens leaves no room in max_length={self.max_length}")
        self._thaw()
        self.cache.reset()
        input_ids = input_ids.to(self.device)
        kwargs: dict[str, Any] = {}
        if attention_mask is not None and not bool(attention_mask.all()):
            attention_mask = attention_mask.to(self.device)
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = padded_positions(attention_mask)
            lengths = attention_mask.long().sum(-1)
        else:
            attention_mask = None
            kwargs["position_ids"] = torch.arange(T, device=self.device)[None].expand(B, T)
            lengths = torch.full((B,), T, dtype=torch.long, device=self.device)
        logits = self._forward(input_ids, **kwargs)
        if attention_mask is not None:
            self.cache.mark_padding(attention_mask)
        self._accept(logits, lengths)
        return self.tokens

    def _accept(self, logits: Tensor, lengths: Tensor, rows: Tensor | None = None) -> None:
        """Greedy first tokens after a prefill of ``rows`` (all when None)."""
        if self.logits is None:
            self.logits = torch.zeros(self.batch_size, logits.shape[-1], dtype=logits.dtype, device=self.device)
        nxt = logits.argmax(-1)
        if rows is None:
            self.tokens.copy_(nxt)
            self.ids.copy_(nxt[:, None])
            self.pos.copy_(lengths[:, None])
            self.logits.copy_(logits)
        else:
            self.tokens[rows] = nxt
            self.ids[rows, 0] = nxt
            self.pos[rows, 0] = lengths
            self.logits[rows] = logits

    @torch.no_grad()
    def step(self) -> Tensor:
        """Decode one token for every row; returns ``tokens`` ``[B]`` (a static buffer: copy it to keep it)."""
        if self.logits is None:
            raise RuntimeError("Decoder.step: prefill first")
        if self.max_length is not None and self.cache.kv_layers:
            if int(self.cache.kv_layers[0].get_seq_length()) + (self._frozen_steps or 0) >= self.max_length:
                raise ValueError(f"Decoder.step: max_length={self.max_length} reached")
        if self.mode == "eager":
            self._step_body()
        elif self.mode == "graph":
            self._graph_step()
        else:
            self._compile_step()
        self.steps += 1
        return self.tokens

    def _freeze(self) -> None:
        if self._frozen_steps is None:
            self.cache.freeze()
            self._frozen_steps = 0

    def _thaw(self) -> None:
        if self._frozen_steps is not None:
            self.cache.unfreeze(self._frozen_steps)
            self._frozen_steps = None

    def _graph_step(self) -> None:
        self._freeze()
        if self._graph is None:
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001 - any capture failure means: decode eagerly, loudly
                warnings.warn(f"CUDA graph capture of the decode step failed ({type(exc).__name__}: {exc}); "
                              "decoding eagerly", stacklevel=3)  # fmt: skip
                self._thaw()
                self.mode = "eager"
                self._step_body()
                return
        else:
            self._graph.replay()
        self._frozen_steps += 1

    def _capture(self) -> None:
        """Warm up with one real step on a side stream (Triton JIT, cuBLAS handles), then record the next one.

        Recording runs no kernel, so this call's token comes from the warm-up step and the graph's first replay
        is the following step.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step_body()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_body()
        self._graph = graph

    def _compile_step(self) -> None:
        self._freeze()
        if self._compiled is None:
            for t in [*self.cache.tensors(), self.ids, self.pos, self.tokens, self.logits]:
                torch._dynamo.mark_static_address(t)
            kwargs: dict[str, Any] = {"dynamic": False}
            if self.compile_backend is not None:
                kwargs["backend"] = self.compile_backend
            else:
                kwargs["mode"] = "reduce-overhead"
            self._compiled = torch.compile(self._step_body, **kwargs)
        self._compiled()
        self._frozen_steps += 1

    # -- slots ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_slot(self, row: int) -> None:
        """Forget row ``row``: zero state, empty window; its tokens are meaningless until ``fill_slot``."""
        self.cache.reset_rows([row])
        self.ids[row] = 0
        self.pos[row] = 0

    @torch.no_grad()
    def fill_slot(self, row: int, prompt: Tensor) -> Tensor:
        """Prefill ``prompt`` ``[T]`` alone into row ``row`` (others untouched); returns its first new token."""
        if self.logits is None:
            raise RuntimeError("Decoder.fill_slot: prefill the batch first (it allocates the cache)")
        prompt = prompt.to(self.device).view(1, -1)
        T = prompt.shape[1]
        dyn = DynamicCache(config=self.model.config)
        kwargs = {self.cache_kw: dyn, "position_ids": torch.arange(T, device=self.device)[None]}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        logits = self.model(input_ids=prompt, use_cache=True, **kwargs).logits[:, -1]
        self.cache.reset_rows([row])
        self.cache.load_row(row, dyn, 0)
        self._accept(logits, torch.tensor([T], device=self.device), rows=torch.tensor([row], device=self.device))
        return self.tokens[row]

    def close(self) -> None:
        """Leave capture mode: the cache's host counters catch up (it can then be used eagerly again)."""
        self._thaw()


@dataclass
class GenerateResult:
    """``sequences`` ``[B, T + N]`` (prompt and new tokens; pad after EOS) and the timings of one ``generate``."""

    sequences: Tensor
    new_tokens: Tensor
    prefill_s: float
    decode_s: float
    decode_steps: int
    mode: str
    logits: list[Tensor] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: new tokens of every row per second of decoding (prefill excluded)."""
        return self.new_tokens.shape[0] * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    capture: str = "graph",
    on_tokens: Callable[[Tensor], None] | None = None,
    output_logits: bool = False,
    decoder: Decoder | None = None,
) -> GenerateResult:
    """Greedy decoding of ``input_ids`` ``[B, T]`` (left-padded where ``attention_mask`` is 0) over a static cache.

    Args:
        eos_token_id: a row stops at it (later tokens are ``pad_token_id``); all rows stopped ends the loop.
        capture: ``"graph"``, ``"compile"`` or ``"eager"`` (``Decoder``).
        on_tokens: called with each step's tokens ``[B]`` on the host (streaming); costs a sync per step.
        output_logits: keep every step's logits ``[B, V]`` (for tests).
        decoder: reuse a ``Decoder`` of the same batch size (its graph is kept across calls).
    """
    B, T = input_ids.shape
    dec = decoder if decoder is not None else Decoder(model, B, T + max_new_tokens, capture=capture)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=dec.device)
    _sync(dec.device)
    t0 = time.perf_counter()
    first = dec.prefill(input_ids, attention_mask)
    out = [first.clone()]
    logits = [dec.logits.clone()] if output_logits else []
    done = torch.isin(first, eos) if eos.numel() else None
    if on_tokens is not None:
        on_tokens(first.cpu())
    _sync(dec.device)
    t1 = time.perf_counter()
    steps = 0
    for _ in range(max_new_tokens - 1):
        if done is not None and bool(done.all()):
            break
        tok = dec.step().clone()
        steps += 1
        if done is not None:
            tok = tok.masked_fill(done, pad_token_id)
            done = done | torch.isin(tok, eos)
        out.append(tok)
        if output_logits:
            logits.append(dec.logits.clone())
        if on_tokens is not None:
            on_tokens(tok.cpu())
    _sync(dec.device)
    t2 = time.perf_counter()
    dec.close()
    new = torch.stack(out, 1)
    seq = torch.cat([input_ids.to(new.device), new], 1)
    return GenerateResult(seq, new, t1 - t0, t2 - t1, steps, dec.mode, logits)


def custom_generate(
    model: nn.Module,
    input_ids: Tensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool = False,
    streamer: Any = None,
    capture: str = "graph",
    **model_kwargs: Any,
) -> Tensor:
    """``model.generate(ids, custom_generate=surgery.generate.custom_generate, max_new_tokens=N, capture="graph")``.

    transformers prepares the inputs and calls this in place of its greedy loop. Greedy only (logits processors
    other than the defaults are not applied); returns the sequences ``[B, T + N]``.
    """
    cfg = generation_config
    if cfg is not None and (getattr(cfg, "do_sample", False) or (getattr(cfg, "num_beams", 1) or 1) > 1):
        raise ValueError("surgery.generate.custom_generate decodes greedily: do_sample=False, num_beams=1")
    max_new = getattr(cfg, "max_new_tokens", None) or 20
    eos = getattr(cfg, "eos_token_id", None)
    eos = eos.tolist() if isinstance(eos, Tensor) else eos
    pad = getattr(cfg, "pad_token_id", None)
    pad = int(pad.item() if isinstance(pad, Tensor) and pad.numel() == 1 else (pad if pad is not None else 0))
    mask = model_kwargs.get("attention_mask")
    on = None
    if streamer is not None:
        streamer.put(input_ids.cpu())
        on = streamer.put
    res = generate(model, input_ids, mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                   capture=capture, on_tokens=on)  # fmt: skip
    if streamer is not None:
        streamer.end()
    return res.sequences


def run_generate(run_dir: str, prompts: list[str], max_new_tokens: int = 64, capture: str = "graph",
                 device: str | None = None, dtype: str | None = None, write: Callable[[str], Any] = print,
                 ) -> GenerateResult:  # fmt: skip
    """``surgery generate``: load a saved model and its tokenizer, stream the first prompt's continuation."""
    from transformers import AutoTokenizer

    from surgery.artifacts import load
    from surgery.outputs import saved_model_dir

    path = saved_model_dir(run_dir)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(path, dtype=dtype, device=dev)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if tok.pad_token is None:
        tok.pad_token_id = pad
    enc = tok(prompts, return_tensors="pt", padding=True)
    streamed: list[int] = []
    shown = [0]

    def on_tokens(step: Tensor) -> None:
        streamed.append(int(step[0]))
        text = tok.decode(streamed, skip_special_tokens=True)
        write(text[shown[0] :])
        shown[0] = len(text)

    res = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                   eos_token_id=tok.eos_token_id, pad_token_id=pad, capture=capture, on_tokens=on_tokens)  # fmt: skip
    return res
