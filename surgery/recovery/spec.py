"""The plan's ``recover:`` section: data, adapters, and the stages in order, each with its own options.

::

    recover:
      data: {source: train.jsonl, seq_len: 512}
      lora: {r: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj]}   # the adapters every stage trains
      stages:                                 # run in this order; each stage's options under its name
        attention_transfer: {tokens: 49152, lr: 7.0e-3}
        lora: {tokens: 49152, lr: 1.0e-3}

``stages`` may also be a list of names (``[attention_transfer, lora]``), each with its default options. Stage names
and options are validated against the registered stages (``surgery.recovery.stage.Stage``, hook
``surgery_stages``), with the same located errors and "did you mean" as mixers. Kept free of heavy imports: the
plan parser reads it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, ValidationInfo, field_validator, model_validator

from surgery.mixer import Options


class TrainOptions(Options):
    """The Trainer settings of one stage. Budget: ``tokens`` or ``max_steps``, else ``epochs`` over the data.

    Defaults are Liger's recipe (liger.md §4): AdamW lr 1e-3 (weight decay 0.01), constant schedule, grad clip 1.0.
    Batch 2 follows the measured CPU anchor (quality_anchor.md); Liger used a global batch of 8.
    """

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(
        2, ge=1, description="chunks per micro-batch; the global batch (batch_size * grad_accum) is split over processes"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step in a single process")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    tokens: int | None = Field(None, ge=1, description="token budget over all processes")
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    seed: int = 0
    save_steps: int = Field(100, ge=1)
    keep_checkpoints: int | None = Field(2, ge=1, description="None keeps all")
    logging_steps: int = Field(1, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (a half-precision model is trained in fp32)"
    )
    gradient_checkpointing: bool = False
    recompute_mixers: bool | None = Field(
        None, description="recompute each converted layer's token mixing in the backward instead of keeping its "
                          "activations (less memory than the base model, a few % slower); None: on CUDA only"
    )

    @model_validator(mode="after")
    def _check_budget(self) -> TrainOptions:
        if self.tokens is not None and self.max_steps is not None:
            raise ValueError(f"give tokens ({self.tokens}) or max_steps ({self.max_steps}), not both")
        return self


#: Settings that do not change the trained weights: a resumed run may differ in them.
NEUTRAL_TRAIN_KEYS = frozenset({"save_steps", "keep_checkpoints", "logging_steps", "recompute_mixers"})


class LoraSpec(Options):
    """LoRA adapters on the converted layers (peft), trained by every stage."""

    r: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj"),
        description="child modules of every converted layer; each converted layer must own each of them",
    )
    modules: tuple[str, ...] | str | None = Field(
        None, description="explicit peft target_modules (paths, suffixes or one regex) replacing targets"
    )
    train_mixer_params: bool = Field(
        True, description="train the parameters a mixer adds beyond q/k/v/o and q/k norms (routers, gates)"
    )

    @model_validator(mode="after")
    def _check(self) -> LoraSpec:
        if self.modules is None and not self.targets:
            raise ValueError("lora.targets is empty: name the projections to adapt, e.g. [q_proj, k_proj, v_proj]")
        for t in self.targets:
            if not t or t.startswith(".") or t.endswith("."):
                raise ValueError(f"lora.targets: '{t}' is not a module path relative to a converted layer")
        return self


class DataSpec(Options):
    """Training text, packed into ``seq_len``-token chunks (documents joined with EOS, no padding)."""

    source: str = Field("yahma/alpaca-cleaned", description="a local .txt/.jsonl file or directory, or a hub dataset")
    name: str | None = Field(None, description="dataset configuration (datasets.load_dataset's second argument)")
    split: str = "train"
    seq_len: int = Field(512, ge=2)
    max_records: int | None = Field(None, ge=1, description="use only the first N documents / examples")


def _registry(info: ValidationInfo | None) -> Any:
    from surgery.registry import context_registry  # the registry imports the stage contract, which imports this

    return context_registry(info)


class RecoverSpec(Options):
    """The ``recover:`` section (see the module docstring). ``stages`` maps stage name -> its validated options."""

    stages: dict[str, SerializeAsAny[Options]] = Field(
        default_factory=lambda: ["lora"],
        validate_default=True,
        description="stages in order: a list of names, or name -> options",
    )
    lora: LoraSpec = LoraSpec()
    data: DataSpec = DataSpec()
    merge: bool = Field(True, description="return the model with LoRA merged into its weights")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun / accelerate launch: ddp (every process holds the model) or fsdp (FSDP2 shards "
        "it); ignored in a single process",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = {"train": "stages.lora", "transfer": "stages.attention_transfer", "save_merged": None}
            for key, where in moved.items():
                if key in data:
                    hint = f"; its settings now live under recover.{where}" if where else (
                        "; the run's save step writes the model once")
                    raise ValueError(f"recover.{key} is no longer a key{hint}")
        return data

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, value: Any, info: ValidationInfo) -> dict[str, Options]:
        if isinstance(value, (list, tuple)):
            if len(set(value)) != len(value):
                raise ValueError(f"{list(value)} names a stage twice")
            value = {name: None for name in value}
        if not isinstance(value, dict):
            raise ValueError("stages is a list of stage names, or a mapping of stage name -> options")
        if not value:
            raise ValueError("stages is empty: name at least one stage (e.g. lora)")
        from surgery.registry import did_you_mean

        registry = _registry(info)
        out: dict[str, Options] = {}
        problems = []
        for name, options in value.items():
            if not isinstance(name, str) or name not in registry.stages:
                problems.append(f"unknown stage '{name}'{did_you_mean(str(name), registry.stages)}")
                continue
            stage_cls = registry.stages[name]
            if isinstance(options, stage_cls.Options):
                out[name] = options
                continue
            try:
                out[name] = stage_cls.Options.model_validate(options or {}, context=info.context)
            except ValidationError as err:
                for e in err.errors():
                    loc = ".".join(map(str, e["loc"]))
                    msg = e["msg"].removeprefix("Value error, ")
                    if e["type"] == "extra_forbid" or e["type"] == "extra_forbidden":
                        key = str(e["loc"][-1])
                        msg = f"unknown key '{key}'{did_you_mean(key, stage_cls.Options.model_fields)}"
                    problems.append(f"{name}.{loc}: {msg}" if loc else f"{name}: {msg}")
        names = list(value)
        for i, name in enumerate(names):
            stage_cls = registry.stages.get(name)
            for later in getattr(stage_cls, "before", ()):
                if later in names[:i]:
                    problems.append(f"{name} must come before {later}")
        if problems:
            raise ValueError("; ".join(problems))
        return out

    def stage_objects(self, registry: Any = None) -> list[Any]:
        """The stages as ``Stage`` instances, in order."""
        registry = registry if registry is not None else _registry(None)
        return [registry.stage(name)(options) for name, options in self.stages.items()]
