"""Training samples: on-the-fly masks seeded for exact resumes, fixed validation masks."""

import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, InvalidDataError
from kscan.physics.masks import make_mask, seed_from_name
from kscan.pipelines.io.fastmri import write_fastmri
from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.kspace_scaling import KspaceScaling
from kscan.pipelines.synthetic import simulate_volume
from kscan.pipelines.train_data import ReconstructionTransform, check_batchable, draw_mask
from kscan.pipelines.undersample import undersample_file, volume_mask

MASKS = (("random",), (4.0,), (0.08,))


def transform(train, kinds=("random",), seed=7):
    return ReconstructionTransform(kinds, (4.0,), (0.08,), seed=seed, train=train)


def test_sample_fields(train_volumes):
    data = SliceDataset(train_volumes)
    item = data[1]
    sample = transform(train=True)(dict(item))
    mask = sample["mask"]
    assert mask.shape == (1, 1, 64) and mask.dtype == torch.float32
    kspace = item["kspace"]
    expected = torch.where(mask.bool(), kspace, torch.zeros_like(kspace))
    assert torch.equal(sample["masked_kspace"], expected)
    assert sample["num_low_frequencies"] == round(64 * 0.08)
    assert sample["target"].shape == (64, 64)
    assert sample["max_value"] == pytest.approx(item["metadata"]["max"])
    assert (sample["fname"], sample["slice_num"]) == (item["fname"], item["slice_num"])


def test_validation_masks_are_kscan_undersample_masks(train_volumes, tmp_path):
    data = SliceDataset(train_volumes)
    val = transform(train=False)
    for index in range(len(data)):
        item = data[index]
        path = train_volumes / item["fname"]
        expected = volume_mask(path, (80, 64), "random", 4.0, 0.08, (0, 64))
        for epoch in (0, 3):
            val.epoch = epoch
            assert torch.equal(val(dict(item))["mask"][0], expected.mask)
    # and the mask kscan undersample writes into the file
    written = undersample_file(path, tmp_path / "u.h5", "random", 4.0, 0.08)
    assert torch.equal(written.mask, expected.mask)


def test_training_masks_follow_seed_epoch_file_and_slice(train_volumes):
    data = SliceDataset(train_volumes)
    first, second = transform(train=True), transform(train=True)
    masks = {}
    for epoch in (0, 1):
        first.epoch = second.epoch = epoch
        for index in range(len(data)):
            item = data[index]
            mask = first(dict(item))["mask"]
            assert torch.equal(mask, second(dict(item))["mask"])  # reproducible
            masks[epoch, index] = mask
            seed = (7, epoch, *seed_from_name(item["fname"], item["slice_num"]))
            direct = make_mask(
                "random", (80, 64), acceleration=[4.0], center_fraction=[0.08], seed=seed
            )
            assert torch.equal(mask[0], direct.mask)
    assert len({tuple(m.flatten().tolist()) for m in masks.values()}) == len(masks)
    other_seed = transform(train=True, seed=8)
    assert not torch.equal(other_seed(dict(data[0]))["mask"], masks[0, 0])


def test_several_kinds_draw_one_per_slice():
    kinds = ("random", "equispaced_fraction")
    drawn = set()
    for slice_num in range(12):
        seed = (0, 0, *seed_from_name("a.h5", slice_num))
        mask = draw_mask(kinds, (32, 64), (4.0, 8.0), (0.08, 0.04), seed)
        equal = [
            torch.equal(
                mask.mask,
                make_mask(
                    kind,
                    (32, 64),
                    acceleration=[4.0, 8.0],
                    center_fraction=[0.08, 0.04],
                    seed=_after_kind_draw(seed, len(kinds)),
                ).mask,
            )
            for kind in kinds
        ]
        assert any(equal)
        drawn.add(equal.index(True))
    assert drawn == {0, 1}


def _after_kind_draw(seed, count):
    """The generator of ``seed`` after the kind was drawn from it."""
    rng = np.random.RandomState(list(seed))
    rng.randint(count)
    return rng


def test_padding_zeroes_the_outer_columns():
    mask = draw_mask(("random",), (8, 64), (2.0,), (0.1,), (1, 2, 3), padding=(4, 60))
    assert mask.mask[0, :4].sum() == 0 and mask.mask[0, 60:].sum() == 0


def test_undersampled_or_targetless_files_are_refused(train_volumes, tmp_path):
    undersample_file(train_volumes / "sim_000.h5", tmp_path / "u" / "u.h5", "random", 4.0, 0.08)
    with pytest.raises(InvalidDataError, match="u.h5: holds undersampled"):
        SliceDataset(tmp_path / "u", transform=transform(True))[0]
    vol = simulate_volume((80, 64), (64, 64), slices=1, coils=4, seed=1)
    write_fastmri(tmp_path / "n" / "n.h5", vol.kspace)
    with pytest.raises(InvalidDataError, match="n.h5: has no .*target"):
        SliceDataset(tmp_path / "n", transform=transform(True))[0]


def test_mixed_sizes_need_batch_size_one(tmp_path):
    for name, shape in (("a", (80, 64)), ("b", (96, 64))):
        vol = simulate_volume(shape, (64, 64), slices=1, coils=4, seed=1)
        write_fastmri(tmp_path / f"{name}.h5", vol.kspace, vol.target)
    data = SliceDataset(tmp_path)
    check_batchable(data, 1, "data.train")
    with pytest.raises(
        ConfigError, match="data.batch_size: 2 needs volumes of one size.*80x64.*96x64"
    ):
        check_batchable(data, 2, "data.train")


def test_scaled_samples_divide_kspace_target_and_range_by_the_factor(train_volumes):
    item = SliceDataset(train_volumes)[1]
    plain = transform(train=True)(dict(item))
    scaling = KspaceScaling(0.99)
    scaled = ReconstructionTransform(("random",), (4.0,), (0.08,), 7, True, scaling)(dict(item))
    s = scaling.factors(plain["masked_kspace"][None])[0].item()
    assert plain["kspace_scale"] == 1.0 and scaled["kspace_scale"] == pytest.approx(s)
    torch.testing.assert_close(scaled["masked_kspace"] * s, plain["masked_kspace"])
    torch.testing.assert_close(scaled["target"] * s, plain["target"])
    assert scaled["max_value"] * s == pytest.approx(plain["max_value"])
