"""RecurrentVarNet with coils and rows split across ranks against the single-process forward."""

import sys
from pathlib import Path

import pytest
import torch

from kscan.errors import ShapeError
from kscan.models.recurrentvarnet import RecurrentVarNet, RecurrentVarNetConfig
from kscan.pipelines.parallel import BandParallelRecurrentVarNet, launch


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    options = {"num_steps": 2, "recurrent_hidden_channels": 4, "recurrent_num_layers": 2, **options}
    config = RecurrentVarNetConfig(**options)
    model = RecurrentVarNet(config).double().eval()
    with torch.no_grad():  # steps away from 1 so that data consistency matters
        for i, block in enumerate(model.block_list):
            block.learning_rate.fill_(0.5 + 0.3 * i)
    return model


INIT = {
    "learned_initializer": True,
    "initializer_channels": (4, 4, 6, 6),
    "initializer_multiscale": 2,
}


def data(coils=4, height=20, width=12, seed=1, per_coil_mask=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, coils, height, width)
    kspace = torch.randn(shape, generator=gen, dtype=torch.complex128)
    maps = torch.randn(shape, generator=gen, dtype=torch.complex128)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    if per_coil_mask:
        mask = (torch.rand(1, coils, 1, width, generator=gen) < 0.5).double()
    else:
        mask = (torch.rand(1, 1, 1, width, generator=gen) < 0.5).double()
    return kspace * mask, mask, maps


def cases():
    """Plain Conv-GRU with a per-coil mask; learned initializer (dilations up to 4: the 20-row
    image in two 10-row bands) with shared parameters; normalised GRU with one layer (its
    read-out is the dilated conv); unequal coil groups (5 coils)."""
    return [
        (tiny(), *data(per_coil_mask=True)),
        (tiny(1, no_parameter_sharing=False, **INIT), *data(seed=2)),
        (tiny(2, normalized=True, recurrent_num_layers=1), *data(seed=3)),
        (tiny(3, normalized=True, **INIT), *data(coils=5, height=21, seed=4)),
    ]


def single(model, kspace, mask, maps):
    with torch.no_grad():
        return model(kspace, mask, maps)


@pytest.fixture
def workers(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import _spawn_workers

    yield _spawn_workers
    sys.modules.pop("_spawn_workers", None)


@pytest.mark.parametrize("index", range(4))
def test_one_rank_equals_the_forward(index):
    model, kspace, mask, maps = cases()[index]
    got = BandParallelRecurrentVarNet(model)(kspace, mask, maps)
    torch.testing.assert_close(got, single(model, kspace, mask, maps), rtol=0, atol=1e-12)
    assert type(model.block_list[0].regularizer).__name__ in ("ConvGRU", "NormConvGRU")  # restored


def test_fewer_coils_than_ranks_is_refused():
    model, kspace, mask, maps = cases()[0]
    runner = BandParallelRecurrentVarNet(model)
    runner.comm.world_size = 5
    with pytest.raises(ShapeError, match="at least 5 coils"):
        runner(kspace, mask, maps)


@pytest.mark.slow
def test_two_ranks_equal_the_single_process_forward(workers):
    all_cases = cases()
    results = launch(workers.run_rvn, 2, (all_cases,))
    for i, (model, kspace, mask, maps) in enumerate(all_cases):
        expected = single(model, kspace, mask, maps)
        got = results[0][i]["output"]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"case {i}")
        sent = [r[i]["sent"] for r in results]
        assert sent[0]["halo"] == sent[1]["halo"] > 0  # two ranks: one neighbour each
        assert sent[0]["image"] > 0 and sent[0]["update"] > 0
        assert ("moments" in sent[0]) == model.config.normalized
