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


def recover(model: Any, plan: Any = None, **kwargs: Any) -> Any:
    """Recovery of a converted model, stage by stage; returns a ``RecoverResult`` (``.model`` is the trained model).

    The plan gives the stages, the tokenizer, the output (``<output>/recover``) and the teacher (its base model,
    loaded only if a stage needs it); keywords replace any of them (``surgery.pipeline.recover_plan``). The verb
    itself, which takes them resolved, is ``surgery.recovery.recover(model, spec, tokenizer, out, teacher)``; peft
    and the Trainer load on first use. The package is named ``surgery.recovery`` so that importing it never replaces
    this function on ``surgery``.
    """
    from surgery.pipeline import recover_plan

    return recover_plan(model, plan, **kwargs)


def evaluate(model: Any, plan: Any = None, **kwargs: Any) -> Any:
    """lm-eval on the converted model and on the plan's base model, side by side; returns the results dict.

    The plan gives the tasks, the base model, the tokenizer and the output (``<output>/eval``); keywords replace any
    of them (``surgery.pipeline.evaluate_plan``). The verb itself, which takes them resolved, is
    ``surgery.evaluate.evaluate(model, spec, base, tokenizer, out)``.
    """
    from surgery.pipeline import evaluate_plan

    return evaluate_plan(model, plan, **kwargs)


def run(plan: Any, **kwargs: Any) -> Any:
    """convert -> recover -> evaluate -> save into the plan's output directory; returns a ``RunReport``
    (see ``surgery.pipeline.run``)."""
    from surgery.pipeline import run as _run

    return _run(plan, **kwargs)
