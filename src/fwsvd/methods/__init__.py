"""Registry of compression methods. Adding one: a new file with a :class:`Method` subclass and a
line in ``METHODS``."""

from __future__ import annotations

from typing import Any

from ..errors import FwsvdError
from .asvd import ASVD
from .base import Method
from .fisher import FWSVD
from .svd import SVD
from .svd_llm import SVDLLM

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SVD, FWSVD, ASVD, SVDLLM)}

__all__ = ["METHODS", "Method", "get_method"]


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
