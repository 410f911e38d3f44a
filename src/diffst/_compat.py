"""Old argument names and positions of the public functions, kept working for one release with a ``FutureWarning``.

``key`` used to name the prepared data in ``dst.tl.train``/``super_resolve``/``upsample``/``tesla``/
``evaluate_spots`` and ``dst.pp.image_features``, and the SR result in ``dst.tl.evaluate``, ``dst.get`` and
``dst.pl``. Now ``prepared_key`` always names prepared data, ``key`` always the result a function reads and
``key_added`` what it writes; the data object is the only positional argument.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: The release that removes the old spellings.
REMOVED_IN = "0.3"


def _warn(text: str) -> None:
    warnings.warn(f"{text}; the old spelling stops working in diffst {REMOVED_IN}.", FutureWarning, stacklevel=3)


def deprecated_arguments(
    *, renamed: dict[str, str] | None = None, positional: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Accept old keyword names (``renamed``: old → new) and old positional use of keyword-only ``positional``.

    The wrapped function keeps its new signature (``inspect.signature`` and the docs show it); calls in the old
    style work and warn once per call, naming the new spelling.
    """
    renamed = dict(renamed or {})

    def decorate(func: F) -> F:
        name = func.__qualname__
        params = inspect.signature(func).parameters
        for new in (*renamed.values(), *positional):
            if new not in params:  # a typo here would silently drop arguments
                msg = f"{name} has no parameter {new!r}"
                raise TypeError(msg)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > 1 and positional:
                extra = args[1:]
                if len(extra) > len(positional):
                    msg = f"{name}() takes 1 positional argument (the data) but {len(args)} were given"
                    raise TypeError(msg)
                moved = dict(zip(positional, extra, strict=False))
                clash = sorted(set(moved) & set(kwargs))
                if clash:
                    msg = f"{name}() got multiple values for {clash}"
                    raise TypeError(msg)
                _warn(
                    f"pass {', '.join(f'`{k}=`' for k in moved)} to {name}() by name, not by position "
                    "(the data are its only positional argument)"
                )
                kwargs.update(moved)
                args = args[:1]
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        msg = f"{name}() got both `{old}=` (its old name) and `{new}=`; pass only `{new}=`"
                        raise TypeError(msg)
                    _warn(f"`{old}=` of {name}() is now `{new}=`")
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
