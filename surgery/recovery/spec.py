"""The plan's ``recover:`` section: data, adapters, and the stages in order, each with its own options.

::

    recover:
      data: {source: train.jsonl, seq_len: 512}
      lora: {r: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj]}   # the adapters every stage trains
      stages:                                 # run in this order; each stage's options under its name
        attention_transfer: {tokens: 49152, lr: 7.0e-3}
        lora: {tokens: 49152, lr: 1.0e-3}

``stages`` may also be a list of names (``[attention_transfer, lora]``), each with its default options. Stage names
and options are validated against the registered stages of the validation context's registry
(``surgery.options.resolve``: hook ``surgery_stages``, contract ``surgery.recovery.stage.Stage``), with the same
located errors and "did you mean" as mixers. Imports only the options helper and the stage contract: the plan parser
reads it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, SerializeAsAny, ValidationError, ValidationInfo, field_validator, model_validator

from surgery.options import Options, RegistryLike, fail, lookup, problem, registry_of, relocate, resolve
from surgery.recovery.stage import Stage


#: Why FSDP2 is refused for this stage: the teacher-forced layers' outputs do not reach the students, so FSDP2's
#: unshard-for-backward hooks (on the layers' outputs) never fire and the backward meets freed parameters.

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
    _registry: RegistryLike = PrivateAttr()
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
        out: dict[str, Options] = {}
        errors = []
        for name, options in value.items():
            try:
                _, out[name] = resolve("stage", name, options, info, name_at=(str(name),), options_at=(str(name),))
            except ValidationError as err:
                errors += relocate(err)
        names = list(value)
        for i, name in enumerate(names):
            if name not in out:
                continue
            for later in lookup("stage", name, info).before:
                if later in names[:i]:
                    errors.append(problem((name,), f"{name} must come before {later}", value[name]))
        if errors:
            fail(errors, cls.__name__)
        return out

    @model_validator(mode="after")
    def _keep_registry(self, info: ValidationInfo) -> RecoverSpec:
        # Kept with the spec (and its copies): recovery builds its stages from the spec alone.
        self._registry = registry_of(info)
        return self

    def stage_objects(self) -> list[Stage]:
        """The stages as ``Stage`` instances, in order (classes from the registry the spec was validated against)."""
        classes = self._registry.table("stage")
        return [classes[name](options) for name, options in self.stages.items()]
