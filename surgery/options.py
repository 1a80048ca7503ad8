"""Options, and "a registered name plus its options", validated in one way for every part of a plan.

A plan names registered classes and gives their options in four places: a rule's ``mixer`` and ``weights``, a
stage under ``recover.stages``, Liger Attention's ``recurrent`` branch, and MoM's ``recurrent`` memory. Each is
validated inside pydantic with ``resolve``: the name is looked up in the registry of the validation context
(``Plan.model_validate(data, context={"registry": registry})``), and the options are validated into that class's
own ``Options``, so every error keeps its full location (``convert.0.options.recurrent.options.gate_rnk``) and all
errors of a plan are reported together.

This module imports only pydantic (the plan schema, the stage contract and every plugin's options build on it).
It knows the registry only through the validation context; ``surgery.plan`` installs the factory of the default
registry, used when an ``Options`` class with a nested name is validated on its own (``LigerAttention.Options()``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NoReturn, Protocol

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, ValidationInfo,
                      model_validator)  # fmt: skip
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["Named", "Options", "RegistryLike", "did_you_mean", "fail", "lookup", "options_for", "problem",
           "registry_of", "relocate", "resolve", "set_default_registry"]  # fmt: skip


class RegistryLike(Protocol):
    """What the resolver needs of a registry: its table of each kind (``surgery.registry.Registry.table``)."""

    def table(self, kind: str) -> Mapping[str, type]: ...


_default_registry: Callable[[], RegistryLike] | None = None


def set_default_registry(factory: Callable[[], RegistryLike]) -> None:
    """Set what ``registry_of`` returns for a validation without a registry in its context (``surgery.plan`` does)."""
    global _default_registry
    _default_registry = factory


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'gla'?"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def problem(loc: tuple[str | int, ...], message: str, value: Any, kind: str = "value_error") -> InitErrorDetails:
    """One error for ``fail``: ``message`` at ``loc`` (relative to the model or field being validated)."""
    # A custom error keeps its message verbatim when pydantic re-raises it from an enclosing model.
    return {"type": PydanticCustomError(kind, message), "loc": loc, "input": value}


def relocate(err: ValidationError, *prefix: str | int) -> list[InitErrorDetails]:
    """The errors of ``err``, each located under ``prefix`` and with its message kept as it was."""
    return [problem((*prefix, *e["loc"]), e["msg"].removeprefix("Value error, "), e.get("input"), e["type"])
            for e in err.errors()]


def fail(errors: list[InitErrorDetails], title: str = "Options") -> NoReturn:
    """Raise ``errors`` as one ``ValidationError``: pydantic prefixes the location of the field being validated."""
    raise ValidationError.from_exception_data(title, errors)


#: The largest magnitude of any number in options (2**53: every integer below it is exact as a float, too).
MAX_NUMBER = 2**53


class Options(BaseModel):
    """Base of every plugin's options and of the plan's sections: unknown keys are errors, values are immutable.

    An unknown key is reported as ``unknown key 'gate_rnk'; did you mean 'gate_rank'?`` at its own location.
    """

    # Floats are finite unless a field says otherwise (Field(allow_inf_nan=True)): a NaN weight or an infinite
    # gradient clip validates into a model that can never load again (its stored plan would not validate).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _unknown_keys(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            out = handler(data)
        except ValidationError as err:
            ours = [e for e in err.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
            if not ours:
                raise
            errors = []
            for e in err.errors():
                if e in ours:
                    key = str(e["loc"][0])
                    errors.append(problem(e["loc"], f"unknown key '{key}'{did_you_mean(key, cls.model_fields)}",
                                         e.get("input"), "unknown_key"))  # fmt: skip
                else:
                    errors.append(problem(e["loc"], e["msg"].removeprefix("Value error, "), e.get("input"), e["type"]))
            fail(errors, err.title)
        # Numbers are bounded before anything is sized from them (a 1e20 step count, a 2**62 buffer).
        big = [(k, v) for k, v in getattr(out, "__dict__", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > MAX_NUMBER]
        if big:
            fail([problem((k,), f"{v!r} is beyond any sane value (at most 2**53 in magnitude)", v) for k, v in big],
                 cls.__name__)  # fmt: skip
        return out


def registry_of(info: ValidationInfo | None) -> RegistryLike:
    """The registry names are resolved against: the validation context's, else the default one."""
    registry = ((getattr(info, "context", None) or {}) if info is not None else {}).get("registry")
    if registry is not None:
        return registry
    if _default_registry is None:
        raise ValueError("no registry to resolve names against: validate with context={'registry': registry}")
    return _default_registry()


def lookup(kind: str, name: Any, info: ValidationInfo | None) -> type:
    """The class registered as ``name`` among the ``kind``s (``mixer``, ``recurrent mixer``, ``weight map``,
    ``stage``). Raises ``ValueError`` naming the closest names, or all of them."""
    registry = registry_of(info)
    table = registry.table(kind)
    if isinstance(name, str) and name in table:
        return table[name]
    listed = f"{kind}s: {', '.join(sorted(table)) or 'none registered'}"
    if kind.startswith("recurrent ") and isinstance(name, str) and name in registry.table("mixer"):
        raise ValueError(f"'{name}' is a mixer but not a {kind}; {listed}")
    raise ValueError(f"unknown {kind} '{name}'{did_you_mean(str(name), table) or '; ' + listed}")


def options_for(cls: type, value: Any, info: ValidationInfo | None) -> Options:
    """``value`` (a mapping, None, or another class's ``Options``) validated into ``cls.Options``.

    Errors are located relative to ``value``; raised inside a field validator, pydantic puts that field in front.
    """
    if isinstance(value, cls.Options):
        return value
    raw = value.model_dump() if isinstance(value, BaseModel) else ({} if value is None else value)
    return cls.Options.model_validate(raw, context=getattr(info, "context", None))


def resolve(
    kind: str, name: Any, value: Any, info: ValidationInfo | None, *, name_at: tuple[str | int, ...] = (),
    options_at: tuple[str | int, ...] = (),
) -> tuple[type, Options]:  # fmt: skip
    """The class registered as ``name`` among the ``kind``s, and ``value`` validated into its ``Options``.

    Raises a ``ValidationError`` whose errors are located at ``name_at`` (an unknown name) or under ``options_at``
    (the options' own errors), relative to the model or field whose validator calls this.
    """
    try:
        cls = lookup(kind, name, info)
    except ValueError as exc:
        fail([problem(name_at, str(exc), name)])
    try:
        return cls, options_for(cls, value, info)
    except ValidationError as err:
        fail(relocate(err, *options_at))


class Named(Options):
    """A registered name and its options, nested in other options: ``{mixer: NAME, options: {...}}``.

    ``NAME`` alone is short for ``{mixer: NAME}`` (default options). After validation ``options`` is an instance
    of the named class's ``Options`` and ``cls`` is that class. Subclasses set ``kind`` (which registry table the
    name is looked up in) and may give ``mixer`` a default.
    """

    kind: ClassVar[str] = "mixer"

    mixer: str = Field(description="a registered name")
    options: SerializeAsAny[Options] | dict[str, Any] = Field(default_factory=dict, description="its options")
    _cls: type | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"mixer": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> Named:
        cls, options = resolve(self.kind, self.mixer, self.options, info, name_at=("mixer",), options_at=("options",))
        # Set in place: an after-validator must return self (pydantic drops a copy made under __init__), and the
        # model is frozen to everyone else.
        object.__setattr__(self, "options", options)
        self._cls = cls
        return self

    @property
    def cls(self) -> type:
        """The registered class ``mixer`` names."""
        if self._cls is None:  # a validated instance always has it; a model_construct'ed one does not
            raise ValueError(f"{type(self).__name__} '{self.mixer}' was not validated against a registry")
        return self._cls

    def with_options(self, options: Options) -> Named:
        """A copy with ``options`` replaced (already validated), keeping the resolved class."""
        out = self.model_copy(update={"options": options})
        out._cls = self._cls
        return out
