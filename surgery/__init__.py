"""surgery: turn pretrained Hugging Face decoder LLMs into gated linear-recurrent models, as a plan says.

    import surgery
    plan = surgery.load_plan("plan.yaml")
    surgery.check(plan)                 # which layer gets which mixer (meta device, no weights)
    model = surgery.convert(plan)       # HF model with mixers swapped in
    surgery.save(model, "out/")         # safetensors + config carrying the plan
    model = surgery.load("out/")        # or AutoModelForCausalLM.from_pretrained("out/")
"""

from __future__ import annotations

from typing import Any

from surgery.artifacts import load, register_auto_classes, save
from surgery.convert import check, convert
from surgery.plan import PlanError, load_plan

__version__ = "0.1.0"
__all__ = ["PlanError", "check", "convert", "evaluate", "load", "load_plan", "recover", "run", "save"]

register_auto_classes()


def recover(model: Any, plan: Any, **kwargs: Any) -> Any:
    """LoRA recovery of a converted model (see ``surgery.recover.recover``)."""
    from surgery.recover import recover as _recover

    return _recover(model, plan, **kwargs)


def evaluate(model: Any, plan: Any, **kwargs: Any) -> dict:
    """lm-eval on the converted and the base model, side by side (see ``surgery.evaluate.evaluate``)."""
    from surgery.evaluate import evaluate as _evaluate

    return _evaluate(model, plan, **kwargs)


def run(plan: Any, **kwargs: Any) -> Any:
    """convert -> recover -> evaluate -> save, into the plan's output directory (see ``surgery.run.run``)."""
    from surgery.pipeline import run as _run

    return _run(plan, **kwargs)
