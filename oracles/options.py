"""Check config options against a factory's signature before anything is built.

Oracle and judge options come from free-form YAML dicts; a misspelt name or a value of the
wrong type would otherwise surface as a ``TypeError`` deep inside stage 2, hours into a run.
:func:`check_options` compares the names with the constructor's parameters and validates each
value against its type hint (with pydantic), so a bad option fails at start-up naming the key.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections import abc
from pathlib import Path
from typing import Any, Callable

from pydantic import ConfigDict, TypeAdapter, ValidationError

from compo.core.errors import UserError, one_line


class OptionError(UserError):
    """A bad option; ``key`` is its dotted path below the options dict."""

    def __init__(self, key: str, what: str):
        self.key = key
        super().__init__(key, what)

    def under(self, prefix: str) -> "OptionError":
        return OptionError(f"{prefix}.{self.key}" if self.key else prefix, self.what)


def _signature(factory: Callable) -> tuple[inspect.Signature | None, dict]:
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None, {}
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        hints = {}
    return sig, hints


_PLAIN = (int, float, str, bool, bytes, type(None), dict, list, tuple, set, Path, os.PathLike)
_CONTAINERS = (dict, list, tuple, set, abc.Sequence, abc.Mapping, abc.Iterable)


def _plain(annotation: Any) -> bool:
    """Only config-like types are checked (numbers, strings, paths, containers, literals):
    objects a library caller may pass (streams, judges, callables) are left to the constructor."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return True
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return all(_plain(a) for a in typing.get_args(annotation))
    if origin is not None:
        return origin in _CONTAINERS and all(_plain(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return annotation in _PLAIN or annotation is Any


def _adapter(annotation: Any) -> TypeAdapter | None:
    if not _plain(annotation):
        return None
    try:
        return TypeAdapter(annotation, config=ConfigDict(allow_inf_nan=False))
    except Exception:  # noqa: BLE001 - a type pydantic cannot describe: accept any value
        return None


def _inherit(cls: type, params: dict, hints: dict) -> bool:
    """A class whose ``__init__`` takes ``**kwargs`` is taken to pass them on to the base
    classes' ``__init__`` (``super().__init__(..., **kwargs)``): add their keyword parameters
    and hints (only those with a default: a required one the subclass passes itself). Returns
    whether the options stay open (some base also takes ``**kwargs`` up to ``object``, e.g. a
    judge that keeps its options as a dict)."""
    for base in cls.__mro__[1:]:
        if base is object:
            return True
        if "__init__" not in vars(base):
            continue
        sig, base_hints = _signature(base)
        if sig is None:
            return True
        for n, p in sig.parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty and n not in params:
                params[n] = p
                if n in base_hints:
                    hints.setdefault(n, base_hints[n])
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return False
    return True


def check_options(factory: Callable, options: dict, label: str) -> dict:
    """Return ``options`` validated against ``factory``'s signature (values coerced to the hinted
    types, e.g. ``"8"`` -> ``8``); raise :class:`OptionError` for an unknown name, a missing
    required option or a value of the wrong type."""
    if not isinstance(options, dict):
        raise OptionError("", f"options of {label} must be a mapping, got {type(options).__name__}")
    sig, hints = _signature(factory)
    if sig is None:
        return dict(options)
    params = {n: p for n, p in sig.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if open_kwargs and isinstance(factory, type):
        open_kwargs = _inherit(factory, params, hints)
    for name in options:
        if name not in params and not open_kwargs:
            raise OptionError(str(name), f"unknown option of {label}; allowed: {', '.join(params) or '(none)'}")
    for name, p in params.items():
        if p.default is p.empty and name not in options:
            raise OptionError(name, f"required option of {label} is missing")
    out = {}
    for name, value in options.items():
        ann = hints.get(name)
        adapter = None if ann is None or ann is Any else _adapter(ann)
        if adapter is None:
            out[name] = value
            continue
        try:
            out[name] = adapter.validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            raise OptionError(name, f"{one_line(err['msg'], 160)} (got {value!r}) for {label}") from None
    return out
