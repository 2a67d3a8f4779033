"""Functions the spawned ranks of test_band.py run; imported by plain name (the test puts this
folder on ``sys.path``, which spawned processes inherit), since test modules are not importable
from a child process."""

import os

from torch import distributed as dist

from kscan.pipelines.parallel import segment_in_bands


def run_cases(cases, transpose_columns=(None,)):
    """``segment_in_bands`` for each ``(model, x)`` and each column mode; per case and mode rank
    0's output and this rank's byte counts."""
    return [
        [
            (r["output"], r["sent"], r["received"])
            for r in (segment_in_bands(model, x, mode) for mode in transpose_columns)
        ]
        for model, x in cases
    ]


def fail_on_rank_one():
    """Rank 1 raises while rank 0 waits for it in a collective."""
    if dist.get_rank() == 1:
        raise ValueError("injected fault on purpose")
    dist.barrier()


def die_on_rank_one():
    """Rank 1 exits abruptly (no exception) while rank 0 waits for it."""
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()
