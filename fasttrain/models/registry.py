"""Name -> model builder registry, with the keyword arguments each builder accepts.

The config system reads `describe(name)` to coerce command-line strings into each argument's annotated type,
so every builder argument must be keyword-able, annotated and defaulted; `register` checks this at import time.
"""

import inspect
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from fasttrain.errors import ConfigError

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}

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


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make `builder` (a class or function returning an nn.Module) available as `create(name)`."""

    def decorate(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is already registered to {_BUILDERS[name].__qualname__}")
        _check_builder(name, builder)
        _BUILDERS[name] = builder
        return builder

    return decorate


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(names())}") from None


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
