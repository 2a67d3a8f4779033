"""Error classes for bad input.

Every error that a user can cause (a wrong file, shape, dtype, mask or configuration) is a
:class:`KscanError`. Its message is one line that names the input (a file or an argument), what
was found and what was expected. The ``kscan`` command prints that line and exits with status 2,
without a traceback.
"""

import contextlib
import os
from collections.abc import Iterator


class KscanError(Exception):
    """Base class of every error caused by bad input to kscan."""


class ShapeError(KscanError, ValueError):
    """A tensor has the wrong number of dimensions, shape or dtype."""


class InvalidDataError(KscanError, ValueError):
    """Data that cannot be processed: NaN or Inf in k-space, empty volumes, ..."""


class MaskError(KscanError, ValueError):
    """A sampling mask that samples nothing or asks for an impossible acceleration."""


class ConfigError(KscanError, ValueError):
    """A configuration key, value or command-line option that is not allowed."""


class FileFormatError(KscanError, OSError):
    """A file that is missing, unreadable or not laid out as its format requires."""


@contextlib.contextmanager
def about_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Prefix the message of a kscan error raised inside the block with ``path``, unless it names it.

    Batch commands wrap the work on each input file in this, so that an error raised deep inside
    (say, NaN in k-space found by a solver) still names the file it came from.
    """
    try:
        yield
    except KscanError as err:
        name = str(path)
        if name in str(err):
            raise
        raise type(err)(f"{name}: {err}") from None
