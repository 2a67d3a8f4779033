"""Functions the spawned ranks of test_sliding_window.py and test_rvn_bands.py run; imported by
plain name (the tests put this folder on ``sys.path``, which spawned processes inherit), since
test modules are not importable from a child process."""

from kscan.pipelines.parallel import Comm, distributed_sliding_window_inference, rvn_in_bands


def run_windows(cases):
    """Each ``(inputs, roi, sw_batch_size, predictor, overlap, mode)``: this rank's whole output
    and its bytes sent."""
    out = []
    for x, roi, sw_batch_size, predictor, overlap, mode in cases:
        comm = Comm()
        y = distributed_sliding_window_inference(
            x, roi, sw_batch_size, predictor, overlap, mode, comm=comm
        )
        out.append((y, dict(comm.sent)))
    return out


def run_rvn(cases):
    """``rvn_in_bands`` for each ``(model, kspace, mask, maps)``."""
    return [rvn_in_bands(*case) for case in cases]
