"""Schemas of the plan's ``recover:`` and ``eval:`` sections (pydantic, unknown keys rejected).

Kept apart from ``plan.py`` so the stages that consume them (``recover.py``, ``evaluate.py``) and the plan
parser share one definition without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from surgery.mixer import Options


class RecoverSpec(Options):
    """The ``recover:`` section: which stages run, on which text, with which LoRA and optimizer settings.

    Defaults are Liger's recipe (liger.md §4): LoRA r=8, alpha=8, dropout 0 on q/k/v of every converted layer,
    AdamW lr 1e-3 (weight decay 0.01), constant schedule, grad clip 1.0, next-token cross-entropy on packed
    fixed-length chunks, Alpaca-cleaned. Sequence length 512 and batch 2 follow the measured CPU anchor
    (quality_anchor.md); Liger used 1024 and a global batch of 8.
    """

    class Lora(Options):
        """LoRA adapters on the converted layers (peft)."""

        r: int = Field(8, ge=1)
        alpha: float = Field(8.0, gt=0)
        dropout: float = Field(0.0, ge=0, lt=1)
        # Child modules of every converted layer (module paths relative to the mixer). Every converted layer
        # must own each of them, so the targets can never silently miss a layer.
        targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
        # Explicit peft ``target_modules`` (full module paths, suffixes or one regex) replacing ``targets``.
        # The run still refuses to start when a converted layer gets no adapter from them.
        modules: tuple[str, ...] | str | None = None
        # Train the parameters a mixer adds beyond q/k/v/o and the model's q/k norms (routers, gates, maps).
        train_mixer_params: bool = True

        @model_validator(mode="after")
        def _check(self) -> RecoverSpec.Lora:
            if self.modules is None and not self.targets:
                raise ValueError("lora.targets is empty: name the projections to adapt, e.g. [q_proj, k_proj, v_proj]")
            for t in self.targets:
                if not t or t.startswith(".") or t.endswith("."):
                    raise ValueError(f"lora.targets: '{t}' is not a module path relative to a converted layer")
            return self

    class Data(Options):
        """Training text, packed into ``seq_len``-token chunks (documents joined with EOS, no padding)."""

        # A local .txt / .jsonl file or a directory of them, or a Hugging Face dataset name.
        source: str = "yahma/alpaca-cleaned"
        name: str | None = None  # dataset configuration (datasets.load_dataset's second argument)
        split: str = "train"
        seq_len: int = Field(512, ge=2)
        max_records: int | None = Field(None, ge=1)  # use only the first N documents / examples

    class Train(Options):
        """One training stage (HF Trainer). Budget: ``tokens`` or ``max_steps``, else ``epochs`` over the data."""

        lr: float = Field(1e-3, gt=0)
        weight_decay: float = Field(0.01, ge=0)
        batch_size: int = Field(2, ge=1)  # per device
        grad_accum: int = Field(1, ge=1)
        max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
        schedule: Literal["constant", "cosine", "linear"] = "constant"
        warmup_steps: int = Field(0, ge=0)
        tokens: int | None = Field(None, ge=1)
        max_steps: int | None = Field(None, ge=1)
        epochs: float = Field(1.0, gt=0)
        seed: int = 0
        save_steps: int = Field(100, ge=1)
        keep_checkpoints: int | None = Field(2, ge=1)  # None keeps all
        logging_steps: int = Field(1, ge=1)
        # auto: bf16 autocast on CUDA, fp32 on CPU (a half-precision model is trained in fp32 there)
        precision: Literal["auto", "bf16", "fp32"] = "auto"
        gradient_checkpointing: bool = False
        # ce: next-token cross-entropy on the data. distill: KL divergence from the base model's next-token
        # distribution (the unconverted model as teacher, run alongside; masked positions skipped).
        loss: Literal["ce", "distill"] = "ce"

        @model_validator(mode="after")
        def _check_budget(self) -> RecoverSpec.Train:
            if self.tokens is not None and self.max_steps is not None:
                raise ValueError(f"give tokens ({self.tokens}) or max_steps ({self.max_steps}), not both")
            return self

    class Transfer(Train):
        """Attention transfer (LoLCATs stage 1): each converted layer learns to output what the original
        attention outputs on the same input (MSE, teacher-forced), before the LoRA stage."""

        # adapters: the LoRA adapters and the mixer's own parameters; mixer_params: the mixer's own only.
        train: Literal["adapters", "mixer_params"] = "adapters"
        # Measured on SmolLM2 + Liger-GLA with LoRA alpha/r = 1 (docs/benchmarks.md): after 18 steps, held-out
        # perplexity 1.45x base from 5e-3, 1.39x from 1e-2, 1.36x from 2e-2. With alpha/r = 2 (the adapters' updates
        # are scaled twice as much) 5e-3 to 7e-3 is best and 2e-2 is unstable, so 1e-2 is the default.
        lr: float = Field(1e-2, gt=0)

    stages: tuple[Literal["attention_transfer", "lora"], ...] = ("lora",)
    lora: Lora = Lora()
    data: Data = Data()
    train: Train = Train()
    transfer: Transfer = Transfer()
    merge: bool = True  # return the model with LoRA merged into the weights
    save_merged: bool = False  # also write the merged model (surgery.save) to <out>/merged

    @model_validator(mode="after")
    def _check_stages(self) -> RecoverSpec:
        if not self.stages:
            raise ValueError("stages is empty: list attention_transfer and/or lora")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages {list(self.stages)} names a stage twice")
        if list(self.stages) == ["lora", "attention_transfer"]:
            raise ValueError("stages: attention_transfer must come before lora")
        return self


class EvalSpec(Options):
    """The ``eval:`` section: which lm-eval tasks run, on how many documents, with which settings.

    Base and converted models always run with the same settings. Local task names (``wiki_ppl``,
    ``wiki_nextsent``, ``passkey_1k``, ``passkey_2k``) resolve to the tasks shipped in ``surgery/tasks``; any other
    name passes through to lm-eval (``piqa``, ``arc_easy``, ``mmlu``...), whose data must be reachable.

    Attributes:
        tasks: task names, in report order.
        limit: documents per task for every task (>= 1) or a fraction of each (< 1); overrides ``limits``.
        limits: documents per task, per task name, merged over ``DEFAULT_LIMITS``; a task not named, or
            named with null, runs in full. The defaults (one window of each of the 20 held-out articles, 10
            next-sentence items, 5 + 4 passkeys: about 28K tokens) take about 65 s for SmolLM2-135M on 2 idle CPU
            cores, and 1.5-2.5 times that for a converted model on the CPU reference kernels.
        num_fewshot: shots per task name (others run zero-shot).
        batch_size: lm-eval batch size (4: about 5 GB peak on the 2K passkey, whose logits are [4, 2K, 49K]).
        max_length: longest input in tokens (the 2K passkey needs about 2,100).
        data_dir: directory of the local tasks' data (what ``surgery.demo.build_data`` writes); None means
            ``<demo root>/data``, built on first use.
    """

    DEFAULT_LIMITS: ClassVar[dict[str, float | None]] = {"wiki_ppl": 20, "wiki_nextsent": 10, "passkey_1k": 5,
                                                         "passkey_2k": 4}

    tasks: tuple[str, ...] = ("wiki_ppl", "wiki_nextsent", "passkey_1k", "passkey_2k")
    limit: Annotated[float, Field(gt=0)] | None = None
    limits: dict[str, Annotated[float, Field(gt=0)] | None] = DEFAULT_LIMITS
    num_fewshot: dict[str, NonNegativeInt] = {"mmlu": 5}
    batch_size: PositiveInt = 4
    max_length: int = Field(default=2560, ge=64)
    data_dir: Path | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks_named(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        if not tasks:
            raise ValueError("eval.tasks is empty: name at least one task (e.g. wiki_ppl)")
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ValueError(f"eval.tasks names {dup} more than once")
        return tasks

    @field_validator("limits")
    @classmethod
    def _over_defaults(cls, limits: dict[str, float | None]) -> dict[str, float | None]:
        # A plan that sets piqa's limit keeps the defaults of the local tasks; null runs a task in full.
        return {**cls.DEFAULT_LIMITS, **limits}
