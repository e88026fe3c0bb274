"""Typed settings: a configuration section read into a dataclass, every value's type checked on the way.

The ground floor of the package (it imports no other ``mlip_uq`` module): the run configuration
(:mod:`mlip_uq.config`), the active-learning configuration (:mod:`mlip_uq.active.config`) and every training
method's ``Settings`` (:mod:`mlip_uq.inference`) read their sections with :func:`settings_from`, and every
error they raise about a section is a :class:`ConfigError` that names the key, its value and what is expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Optional, Sequence, Tuple

#: the value of a pre-trained-weights option (``sgmcmc.init``, ``sgmcmc.prior.center``, ``vi.init``) that names
#: the MAP model the run trains first, instead of a file
FROM_MAP = "map"


class ConfigError(ValueError):
    """A configuration file, section, option or override that cannot be used."""


def settings_from(cls, values: Any, section: str, kind: Optional[str] = None):
    """``cls(**values)`` for a settings dataclass, with every option's type checked against ``cls``'s annotations.

    An option whose annotation is a dataclass (or an ``Optional`` of one) and whose value is a mapping is read
    into that dataclass the same way, its errors named ``section.option.key``. A ``ValueError`` raised by the
    dataclass's own checks (``__post_init__``) is raised as a :class:`ConfigError` naming ``section``.

    Args:
        cls: the dataclass.
        values: the options (a mapping; None is read as no options).
        section: the configuration key of ``values``, named in errors (e.g. ``training``, ``sgmcmc.prior``).
        kind: the section's ``kind`` when ``cls`` is one of several (``data.split``, ``explore``, ``rule``),
            named in the errors about unknown and missing options.

    Raises:
        ConfigError: ``values`` is not a mapping, an option is unknown or missing (an option without a
            default), or a value has the wrong type (the error names the key, its value and what is expected).

    Example:
        >>> @dataclasses.dataclass
        ... class Example:
        ...     max_epochs: int = 10
        >>> settings_from(Example, {"max_epochs": 5}, "training")
        Example(max_epochs=5)
        >>> settings_from(Example, {"max_epochs": "ten"}, "training")
        Traceback (most recent call last):
        ...
        mlip_uq.settings.ConfigError: training.max_epochs='ten': expected an integer
    """
    values = {} if values is None else values
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{section}={values!r}: expected a mapping of options")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = {f.name for f in fields}
    for_kind = f" for kind {kind}" if kind else ""
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {sorted(unknown)}{for_kind}; known: {sorted(known)}")
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{section}{' of kind ' + kind if kind else ''} needs {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for name, value in values.items():
        key = f"{section}.{name}"
        check_type(value, hints[name], key)
        nested = [h for h in _alternatives(hints[name]) if dataclasses.is_dataclass(h)]
        if isinstance(value, dict) and len(nested) == 1:
            values[name] = settings_from(nested[0], value, key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:  # the dataclass's own checks
        raise ConfigError(f"{section}: {error}") from error


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             list: "a list", type(None): "null"}


def check_type(value: Any, hint: Any, key: str) -> None:
    """Check a configuration value against a type annotation (``int``, ``float``, ``bool``, ``str``, ``dict``,
    ``list``, their ``Optional``/``Union``, ``Literal``, a dataclass = a mapping).

    An ``int`` is not a ``bool`` (``true`` for ``max_epochs`` is an error), a ``float`` accepts integers.

    Raises:
        ConfigError: ``key=value: expected ...``.

    Example:
        >>> check_type(5, typing.Optional[int], "sgmcmc.cycle_steps")
        >>> check_type(1.5, int, "sgmcmc.n_chains")
        Traceback (most recent call last):
        ...
        mlip_uq.settings.ConfigError: sgmcmc.n_chains=1.5: expected an integer
    """
    options = _alternatives(hint)
    if any(_matches(value, option) for option in options):
        return
    raise ConfigError(f"{key}={value!r}: expected {' or '.join(_describe(o) for o in options)}")


def section_mapping(values: Any, section: str) -> dict:
    """``values`` (None: empty) as a dict, or a :class:`ConfigError` naming ``section``."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}={values!r}: expected a mapping of options")
    return values


def _alternatives(hint: Any) -> Tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(a for arg in typing.get_args(hint) for a in _alternatives(arg))
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence, Sequence):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Mapping, typing.Dict):
        return isinstance(value, dict)
    return isinstance(value, origin)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if origin in (tuple, typing.Sequence, Sequence):
        origin = list
    return _EXPECTED.get(origin, getattr(origin, "__name__", str(origin)))
