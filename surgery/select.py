"""Layer selection for hybrids: which layers to keep as softmax attention.

Converting one layer alone moves the model's next-token distribution; the layers that move it most are the ones
a hybrid should keep (the KL-guided selection of arXiv 2512.20569, here one layer at a time against the base,
research/recall.md section 1). ``layer_damage`` measures, for every layer the plan converts, the mean
``KL(base || base with only that layer converted)`` over calibration tokens; ``hybrid_plan`` writes the plan with
the ``keep`` most damaging layers left out of every rule (a layer no rule selects stays the base's softmax
attention). ``surgery select PLAN --keep K`` does both.

Every layer is converted once (the plan's mixers and weight maps, no training); each is then swapped into the
base model in turn, so the cost is one forward per layer and calibration chunk and two models in memory.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from surgery.errors import PlanError
from surgery.plan import Plan, select_layers

__all__ = ["LayerDamage", "calibration_ids", "hybrid_plan", "layer_damage", "select"]


@dataclass
class LayerDamage:
    """``kl[layer]``: mean KL (nats per token) of the base's next-token distribution to the one-layer conversion."""

    kl: dict[int, float]
    tokens: int
    ranking: list[int] = field(default_factory=list)  # most damaging first

    def keep(self, k: int) -> list[int]:
        """The ``k`` layers to keep as softmax attention, sorted."""
        if not 0 <= k <= len(self.ranking):
            raise ValueError(f"keep={k}: the plan converts {len(self.ranking)} layers")
        return sorted(self.ranking[:k])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kl(base_logits: Tensor, logits: Tensor) -> Tensor:
    """Sum over tokens of ``KL(p_base || p)``; logits ``[B, T, V]``."""
    lp, lq = base_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum()


def layer_damage(plan: Plan, base: nn.Module, ids: Tensor,
                 progress: Callable[[str], None] | None = None) -> LayerDamage:  # fmt: skip
    """Per converted layer, the mean KL of the base to the base with only that layer converted.

    Args:
        plan: a loaded plan; its ``convert`` rules say which layers get which mixer (``recover`` is ignored).
        base: the plan's pretrained model (left as it was).
        ids: ``[N, T]`` calibration token ids (chunks of real text).
        progress: called with a line after each calibration chunk (e.g. ``print``).

    Returns:
        A ``LayerDamage`` with the layers ranked, most damaging first.
    """
    from surgery.convert import convert

    converted = convert(plan, copy.deepcopy(base)).eval()
    records = converted.surgery.manifest
    mixers = {r.layer: (r.path, converted.get_submodule(r.path)) for r in records}
    device = next(base.parameters()).device
    totals = {layer: 0.0 for layer in mixers}
    t0 = time.perf_counter()
    with torch.no_grad():
        for c, chunk in enumerate(ids):
            x = chunk[None].to(device)
            ref = base(x).logits
            for layer, (path, mixer) in mixers.items():
                parent_path, _, child = path.rpartition(".")
                parent = base.get_submodule(parent_path) if parent_path else base
                original = getattr(parent, child)
                setattr(parent, child, mixer)
                try:
                    totals[layer] += _kl(ref, base(x).logits).item()
                finally:
                    setattr(parent, child, original)
            if progress is not None:
                worst = max(totals, key=totals.get)
                progress(f"select: chunk {c + 1}/{len(ids)} ({chunk.numel()} tokens, {len(mixers)} layers) done in "
                         f"{time.perf_counter() - t0:.0f} s; most damaging so far: layer {worst}")
    n = ids.numel()
    kl = {layer: total / n for layer, total in totals.items()}
    return LayerDamage(kl=kl, tokens=n, ranking=sorted(kl, key=lambda i: -kl[i]))


def hybrid_plan(raw: dict[str, Any], keep: list[int], n_layers: int) -> dict[str, Any]:
    """The plan (as its YAML dict) with ``keep`` removed from every rule's layers (written as explicit lists).

    A rule left with no layer is dropped; ``keep`` layers then stay the base's softmax attention.
    """
    from surgery.plan import Rule

    raw = copy.deepcopy(raw)
    rules = []
    for rule in raw.get("convert") or []:
        layers = select_layers(Rule.model_validate({**rule, "options": {}, "weight_options": {}}).layers, n_layers)
        left = [i for i in layers if i < n_layers and i not in keep]
        if left:
            rules.append({**rule, "layers": left})
    if not rules:
        raise ValueError(f"keeping layers {keep} leaves nothing to convert")
    raw["convert"] = rules
    return raw


def calibration_ids(
    plan: Plan, tokenizer: Any, tokens: int, seq_len: int | None = None, data: str | Path | None = None
) -> Tensor:
    """``[N, seq_len]`` token ids, about ``tokens`` in all: from ``data`` (a text source as ``recover.data.source``
    takes it) or else the plan's ``recover.data``, in chunks of ``seq_len`` (default: the plan's, else 512).

    Raises:
        PlanError: neither ``data`` nor a ``recover.data`` section says what text to calibrate on.
    """
    from surgery.recovery.data import load_chunks
    from surgery.recovery.spec import DataSpec

    section = plan.recover.data if plan.recover is not None else None
    if data is not None:
        base = section if section is not None else DataSpec()
        spec = base.model_copy(update={"source": str(data), "seq_len": seq_len or base.seq_len})
    elif section is not None:
        spec = section.model_copy(update={"seq_len": seq_len or section.seq_len})
    else:
        raise PlanError([("recover.data", "surgery select needs calibration text: give the plan a recover.data "
                                          "section, or pass --data FILE (surgery.select(..., data=FILE))")])  # fmt: skip
    chunks = load_chunks(spec, tokenizer)
    n = max(1, min(len(chunks), round(tokens / spec.seq_len)))
    # Spread over the data (every k-th chunk), not only its first documents.
    step = max(1, len(chunks) // n)
    return torch.stack([chunks[i * step]["input_ids"] for i in range(n)])


#: First line of every plan ``surgery select`` writes: what lets a later run replace it (and nothing else).
SELECT_HEAD = "# written by surgery select: "


def _check_out(path: Path, plan_path: Path, what: str) -> None:
    """Refuse, before any work, an output that is the input plan, a link, a directory, or a file select did not
    write (its first line is not ``SELECT_HEAD``; a ranking's JSON has ``"written_by": "surgery select"``)."""
    from surgery.errors import OutputError
    from surgery.outputs import refuse_link

    refuse_link(path, what)
    if path.exists() and plan_path.exists() and path.resolve() == plan_path.resolve():
        raise OutputError(f"{what} {path} is the input plan; write the hybrid plan to another file")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; name a file")
    if path.exists():
        try:
            text = path.read_text()[:4096]
        except (OSError, UnicodeDecodeError):
            text = ""
        ours = text.startswith(SELECT_HEAD) or '"written_by": "surgery select"' in text
        if not ours:
            raise OutputError(f"{what} {path} exists and was not written by surgery select; move it away or choose "
                              "another file")  # fmt: skip


def select(plan_path: str | Path, keep: int, tokens: int = 2048, out: str | Path | None = None,
           seq_len: int | None = None, data: str | Path | None = None,
           ranking: str | Path | None = None) -> tuple[LayerDamage, dict[str, Any]]:  # fmt: skip
    """``surgery select``: measure ``plan_path``'s layers, write the hybrid plan keeping the ``keep`` worst.

    Returns the measurement and the hybrid plan (dict). With ``out``, writes ``out`` (YAML) and nothing else; with
    ``ranking``, writes the per-layer KL and the ranking there (JSON). Neither may be the input plan nor a file
    that ``surgery select`` did not write (checked before the measurement); both are written atomically.
    """
    import yaml

    from surgery.convert import load_model, load_tokenizer, num_layers
    from surgery.outputs import write_file
    from surgery.plan import load_plan

    if keep < 0:
        raise PlanError([("--keep", f"{keep} is negative: name how many layers to keep as softmax attention")])
    if tokens < 1:
        raise PlanError([("--tokens", f"{tokens}: need at least one calibration token")])
    plan = load_plan(plan_path)
    for path, what in ((out, "--out"), (ranking, "--ranking")):
        if path is not None:
            _check_out(Path(path), Path(plan_path), what)
    if out is not None and ranking is not None and Path(out).absolute() == Path(ranking).absolute():
        raise PlanError([("--ranking", "names the same file as --out")])
    raw = yaml.safe_load(Path(plan_path).read_text())
    base = load_model(plan)
    tokenizer = load_tokenizer(plan)
    ids = calibration_ids(plan, tokenizer, tokens, seq_len, data)
    damage = layer_damage(plan, base, ids, progress=lambda line: print(line, file=sys.stderr, flush=True))
    hybrid = hybrid_plan(raw, damage.keep(keep), num_layers(base))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        where = f"per layer in {Path(ranking).name}" if ranking is not None else "per layer: surgery select --ranking"
        head = (f"{SELECT_HEAD}{Path(plan_path).name} with layers {damage.keep(keep)} kept as softmax attention: the "
                f"{keep} whose conversion alone moves the next-token distribution most\n# (KL to the base on "
                f"{damage.tokens} calibration tokens; {where}).\n")
        write_file(out, head + yaml.safe_dump(hybrid, sort_keys=False))
    if ranking is not None:
        Path(ranking).parent.mkdir(parents=True, exist_ok=True)
        body = {"written_by": "surgery select"} | damage.to_dict() | {"keep": damage.keep(keep)}
        write_file(Path(ranking), json.dumps(body, indent=1))
    return damage, hybrid
