"""Shared pieces of the ``kscan`` subcommands: common options and value parsers.

Each command module exposes ``register(subparsers)``, which adds its parser with these options and
sets ``func`` to a handler taking the parsed ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

import torch

from kscan.errors import ConfigError


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)"
    )


def add_seed(
    parser: argparse.ArgumentParser, default: int | None = 0, help: str = "random seed"
) -> None:
    parser.add_argument("--seed", type=int, default=default, help=f"{help} (default {default})")


def device(name: str) -> torch.device:
    """A torch device from its name, with a one-line error when it is unknown or unavailable."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"--device: unknown device {name!r}; expected cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device: {name} was asked for but CUDA is not available on this machine"
        )
    return dev


def int_pair(text: str) -> tuple[int, int]:
    """``"640,368"`` or ``"640x368"`` -> ``(640, 368)`` (for argparse ``type=``)."""
    parts = text.replace("x", ",").split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two integers like 640,368, got {text!r}"
        ) from None
    return a, b


def int_list(minimum: int = 1) -> Callable[[str], tuple[int, ...]]:
    """A parser of comma-separated integers, each at least ``minimum`` (for argparse ``type=``)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers of at least {minimum}, got {text!r}"
            )
        return values

    return parse


def dtype_list(names: Mapping[str, torch.dtype]) -> Callable[[str], tuple[torch.dtype, ...]]:
    """A parser of comma-separated dtype names among ``names`` (for argparse ``type=``)."""

    def parse(text: str) -> tuple[torch.dtype, ...]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        if not chosen or any(name not in names for name in chosen):
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(names)}, got {text!r}")
        return tuple(names[name] for name in chosen)

    return parse
