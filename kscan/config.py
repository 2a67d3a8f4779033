"""Dataclass configs from and to plain mappings (parsed YAML or JSON).

Every kscan config is a dataclass. :func:`from_mapping` builds one from a mapping and rejects
unknown keys with a message that names the key and its place (``train.optimizer.lr``), so a typo
in a YAML file fails before anything runs instead of being ignored. Fields whose type is itself a
dataclass are built recursively; list values become tuples where the field's default is a tuple
(YAML has no tuples). :func:`to_mapping` is the inverse, giving JSON-ready values.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from kscan.errors import ConfigError

T = TypeVar("T")


def _dataclass_type(annotation: Any) -> type | None:
    """The dataclass named by a field annotation (``X``, ``X | None``), or None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``values``; unknown keys raise :class:`ConfigError`.

    Args:
        cls: a dataclass type; its ``__post_init__`` validates the values.
        values: a mapping of field names to values (None means all defaults).
        where: the dotted place of this mapping in a larger config, for messages.
    """
    prefix = f"{where}." if where else ""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where or cls.__name__}: expected a mapping of keys to values, got {values!r}"
        )
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{prefix}{key}: unknown key in {cls.__name__}; "
                f"expected one of {', '.join(sorted(fields))}"
            )
        nested = _dataclass_type(hints[key])
        if nested is not None and (value is None or isinstance(value, Mapping)):
            value = None if value is None else from_mapping(nested, value, f"{prefix}{key}")
        elif isinstance(value, list) and isinstance(_default(fields[key]), tuple):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if not prefix or str(err).startswith(prefix):
            raise
        raise ConfigError(f"{prefix}{err}") from None
    except TypeError as err:  # a value of the wrong kind caught by a dataclass operation
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def to_mapping(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (nested dataclasses as dicts, tuples as lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
