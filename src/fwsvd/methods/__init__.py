"""Registry of compression methods. Adding one: a new file with a :class:`Method` subclass and a
line in ``METHODS``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..errors import FwsvdError
from .asvd import ASVD
from .base import Method
from .fisher import FWSVD
from .svd import SVD
from .svd_llm import SVDLLM

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SVD, FWSVD, ASVD, SVDLLM)}

__all__ = ["METHODS", "Method", "check_options", "get_method"]


def get_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method with its options (unknown options for it are ignored).

    Raises:
        FwsvdError: for an unknown method name.
    """
    cls = METHODS.get(name)
    if cls is None:
        raise FwsvdError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    fields = getattr(cls, "__dataclass_fields__", {})
    try:
        return cls(**{k: v for k, v in options.items() if k in fields and v is not None})
    except ValueError as err:
        raise FwsvdError(str(err)) from err


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Check a method's recorded options: known keys only, each of its field's type, finite, and accepted by the method.

    Args:
        name: a registered method name.
        options: ``{option: value}`` as :meth:`Method.options` records them.

    Raises:
        ValueError: naming the method, the option and its value.
    """
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"method {name!r} is not one of {', '.join(METHODS)}")
    known = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for key, value in options.items():
        spec = known.get(key)
        if spec is None:
            raise ValueError(f"method {name} has no option {str(key)[:40]!r} (options: {', '.join(known) or 'none'})")
        default = spec.default
        if isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:  # pragma: no cover - every option today is a string or a number
            ok = type(value) is type(default)
        if not ok:
            raise ValueError(f"option {key} of method {name} is {str(value)[:40]!r}, not a finite {type(default).__name__}")
    try:
        cls(**dict(options))
    except (ValueError, TypeError) as err:
        raise ValueError(f"options of method {name} are refused: {err}") from err
