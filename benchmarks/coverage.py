"""Coverage sweep: every causal-LM class transformers registers, converted as a tiny model and checked four ways.

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` that is in scope (a decoder-only LM whose token mixing
is softmax attention), a tiny config (2 layers, hidden 64, GQA where the family has it) is built and checked:

1. ``check``: ``surgery.check`` of a Liger plan on the meta device;
2. ``identity``: every layer -> ``softmax`` + ``copy_qkvo`` gives bit-identical logits;
3. ``decode``: ``liger_attention`` and ``gla``: prefill + token-by-token decoding == one full forward;
4. ``save``: ``surgery.save`` -> ``surgery.load`` and ``AutoModelForCausalLM.from_pretrained`` give identical logits.

Out-of-scope types are listed with their reason (``OUT_OF_SCOPE``). ``python benchmarks/coverage.py`` runs the
sweep and rewrites the table of ``docs/architectures.md`` between its markers; ``tests/test_coverage.py`` runs the
same checks in CI.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.coverage_configs import KNOWN_GAPS, OUT_OF_SCOPE, in_scope_types, tiny_config  # noqa: E402

CHECKS = ("check", "identity", "decode", "save")
WINDOW = 3  # Liger's softmax window in the sweep: shorter than the sequences, so keys really leave it


@dataclass
class Outcome:
    """The result of the four checks for one model type; ``error`` holds the first failure's one-line reason."""

    model_type: str
    model_class: str = ""
    passed: dict[str, bool] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(self.passed.get(c, False) for c in CHECKS)


def _plan(mixer: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    rule = {"layers": "all", "mixer": mixer, "options": options or {}}
    return {"version": 2, "model": "unused/hub-id", "convert": [rule]}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 model of ``model_type`` in eval mode; 1-D parameters perturbed so that biases and norms matter."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = tiny_config(model_type)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    torch.manual_seed(seed)
    model = cls._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError):
        model.set_attn_implementation("eager")
    return model.float().eval()


def meta_model(model_type: str) -> torch.nn.Module:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    with torch.device("meta"):
        return cls._from_config(tiny_config(model_type))


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, min(vocab, 160), (batch, length), generator=torch.Generator().manual_seed(seed))


def _vocab(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _convert(model: torch.nn.Module, mixer: str, registry: Any, options: dict[str, Any] | None = None) -> Any:
    import surgery

    return surgery.convert(surgery.load_plan(_plan(mixer, options), registry), copy.deepcopy(model))


def _decode_matches(model: torch.nn.Module, ids: torch.Tensor, prefill: int) -> str:
    """'' when prefill + one token at a time reproduces one full forward, else what differs."""
    from surgery.generate import cache_kwarg

    # The cache goes in under the forward's own keyword: families new in transformers 5.25 (Ergo) take only ``cache``.
    name = cache_kwarg(model)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prefill], use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{name: cache})
            parts.append(out.logits)
            cache = out.past_key_values
    got = torch.cat(parts, 1)
    if torch.allclose(got, full, rtol=1e-4, atol=5e-5):
        return ""
    return f"decoded logits differ from the full forward by {(got - full).abs().max().item():.2e}"


def run_checks(model_type: str, registry: Any, workdir: Path) -> Outcome:
    """The four checks for ``model_type``; stops at the first failing one, recording a one-line reason."""
    import surgery
    from transformers import AutoModelForCausalLM

    out = Outcome(model_type)
    start = time.perf_counter()
    step = "check"
    try:
        meta = meta_model(model_type)
        out.model_class = type(meta).__name__
        matches = surgery.check(surgery.load_plan(_plan("liger_attention"), registry), meta)
        out.passed["check"] = bool(matches)
        if not matches:
            raise RuntimeError("no layer to convert")
        step = "identity"
        model = tiny_model(model_type)
        ids = _ids(2, 9, _vocab(model))
        with torch.no_grad():
            ref = model(ids).logits
            same = _convert(model, "softmax", registry)(ids).logits
        out.passed["identity"] = torch.equal(ref, same)
        if not out.passed["identity"]:
            raise RuntimeError(f"softmax identity differs by {(ref - same).abs().max().item():.2e}")
        step = "decode"
        liger = _convert(model, "liger_attention", registry, {"window": WINDOW})
        for name, converted in (("liger_attention", liger), ("gla", _convert(model, "gla", registry))):
            why = _decode_matches(converted, ids, prefill=5)
            if why:
                raise RuntimeError(f"{name}: {why}")
        out.passed["decode"] = True
        step = "save"
        with torch.no_grad():
            ref = liger(ids).logits
        path = surgery.save(liger, workdir / model_type)
        for loaded in (surgery.load(path), AutoModelForCausalLM.from_pretrained(path)):
            loaded.set_attn_implementation(liger.config._attn_implementation)
            with torch.no_grad():
                if not torch.equal(loaded(ids).logits, ref):
                    raise RuntimeError(f"{type(loaded).__name__} after save/load gives other logits")
        out.passed["save"] = True
    except Exception as exc:  # noqa: BLE001 - a sweep records every failure and goes on
        out.passed.setdefault(step, False)
        out.error = f"{step}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    out.seconds = time.perf_counter() - start
    return out


def sweep(types: list[str] | None = None) -> list[Outcome]:
    from surgery.registry import load_registry

    registry = load_registry(autoload=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in types or in_scope_types():
            results.append(run_checks(model_type, registry, Path(tmp)))
    return results


BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def markdown(results: list[Outcome]) -> str:
    import transformers

    ok = sum(r.ok for r in results)
    lines = [
        f"transformers {transformers.__version__}: **{ok} of {len(results)}** in-scope causal-LM classes pass all "
        f"four checks; {len(OUT_OF_SCOPE)} model types are out of scope.",
        "",
        "| model type | class | check | identity | decode | save | note |",
        "|---|---|---|---|---|---|---|",
    ]
    mark = {True: "yes", False: "**no**", None: "-"}
    for r in results:
        cells = [mark[r.passed.get(c)] for c in CHECKS]
        note = KNOWN_GAPS.get(r.model_type, r.error) if not r.ok else ""
        lines.append(f"| {r.model_type} | {r.model_class} | {' | '.join(cells)} | {note.replace('|', '/')} |")
    lines += ["", "Out of scope:", "", "| model type | reason |", "|---|---|"]
    lines += [f"| {t} | {why} |" for t, why in sorted(OUT_OF_SCOPE.items())]
    return "\n".join(lines)


def write_doc(results: list[Outcome], doc: Path) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{BEGIN}\n{markdown(results)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("types", nargs="*", help="model types to check (default: every in-scope one)")
    p.add_argument("--doc", default=str(Path(__file__).resolve().parents[1] / "docs" / "architectures.md"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = sweep(args.types or None)
    for r in results:
        print(f"{r.model_type:28s} {'ok ' if r.ok else 'FAIL'} {r.seconds:5.1f}s {r.error}", flush=True)
    if not args.no_write and not args.types:
        write_doc(results, Path(args.doc))
    print(f"{sum(r.ok for r in results)} of {len(results)} pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
