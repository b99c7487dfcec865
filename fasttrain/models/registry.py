"""Name -> model builder registry, with the keyword arguments each builder accepts.

The config system reads `describe(name)` to coerce command-line strings into each argument's annotated type,
so every builder argument must be keyword-able, annotated and defaulted; `register` checks this at import time.

A model that was renamed keeps its former names (`register(name, former_names=...)`): `create`, `describe` and
`canonical_name` accept them, so old configs and checkpoints still build the network they meant, while `names()`
lists only current names. `resnet9` is the former name of `resnet9_myrtle` (the Myrtle.ai net it always built);
the resnet9 *recipe* trains FFCV's network, `resnet9_ffcv`.
"""

import inspect
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from fasttrain.errors import ConfigError

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_FORMER_NAMES: dict[str, str] = {}  # former name -> current name

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _signature_parameters(builder: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    # eval_str resolves string annotations (PEP 563 modules) into real types.
    return dict(inspect.signature(builder, eval_str=True).parameters)


def _check_builder(name: str, builder: Callable[..., nn.Module]) -> None:
    for param in _signature_parameters(builder).values():
        where = f"model {name!r} ({builder.__qualname__}) argument {param.name!r}"
        if param.kind not in _KEYWORD_KINDS:
            raise TypeError(f"{where}: builders take named arguments only, not *args/**kwargs/positional-only")
        if param.annotation is inspect.Parameter.empty:
            raise TypeError(f"{where} needs a type annotation")
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"{where} needs a default")


def _check_name_is_free(name: str) -> None:
    if name in _BUILDERS:
        raise ValueError(f"model name {name!r} is already registered to {_BUILDERS[name].__qualname__}")
    if name in _FORMER_NAMES:
        raise ValueError(f"model name {name!r} is already the former name of {_FORMER_NAMES[name]!r}")


def register(name: str, former_names: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    """Decorator: make `builder` (a class or function returning an nn.Module) available as `create(name)`, and
    under each of its `former_names` (names it had before a rename)."""

    def decorate(builder: Builder) -> Builder:
        for taken in (name, *former_names):
            _check_name_is_free(taken)
        _check_builder(name, builder)
        _BUILDERS[name] = builder
        _FORMER_NAMES.update(dict.fromkeys(former_names, name))
        return builder

    return decorate


def names() -> list[str]:
    """Registered model names, sorted (former names not included)."""
    return sorted(_BUILDERS)


def former_names() -> dict[str, str]:
    """Former model names, each with the current name it stands for."""
    return dict(_FORMER_NAMES)


def canonical_name(name: str) -> str:
    """The current name of model `name` (itself, or the model a former name stands for)."""
    if not isinstance(name, str):  # a YAML list or mapping, say: unhashable, and never a model's name
        raise ConfigError(f"a model name is a string, got {name!r}; choose one of: {', '.join(names())}")
    current = _FORMER_NAMES.get(name, name)
    if current not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    return current


def _builder(name: str) -> Callable[..., nn.Module]:
    return _BUILDERS[canonical_name(name)]


def describe(name: str) -> dict[str, inspect.Parameter]:
    """Every keyword argument of model `name`, with its (resolved) type annotation and default."""
    return _signature_parameters(_builder(name))


def create(name: str, **kwargs: object) -> nn.Module:
    """Build model `name`; unknown keyword arguments are a ConfigError listing the valid ones."""
    builder = _builder(name)
    valid = list(_signature_parameters(builder))
    unknown = [key for key in kwargs if key not in valid]
    if unknown:
        raise ConfigError(
            f"model {name!r} has no argument(s) {', '.join(map(repr, unknown))}; valid arguments: {', '.join(valid)}"
        )
    return builder(**kwargs)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile (`._orig_mod`) and DataParallel/DDP (`.module`) wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model


def data_init(model: nn.Module, images: torch.Tensor) -> bool:
    """Run the model's data-dependent initialisation on `images` (float32, normalised, unaugmented NCHW training
    images) if it has one, and say whether it did. Wrappers (DDP, torch.compile) are looked through."""
    init = getattr(_unwrapped(model), "data_init", None)
    if init is None:
        return False
    init(images)
    return True
