"""``kscan segment`` and its transforms, against direct runs of the model with numpy preprocessing."""

import json

import h5py
import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from kscan.errors import ConfigError, FileFormatError, InvalidDataError, ShapeError
from kscan.models import registry
from kscan.pipelines import checkpoint as checkpoint_module
from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.checkpoint import read_checkpoint, save_checkpoint
from kscan.pipelines.cli import main
from kscan.pipelines.io.dicom import read_series
from kscan.pipelines.io.dicom_seg import read_segmentation
from kscan.pipelines.io.nifti import (
    axial_affine,
    nifti_array_to_volume,
    read_nifti,
    volume_to_nifti_array,
    write_nifti,
)
from kscan.pipelines.provenance import sha256_file, sidecar_path
from kscan.pipelines.seg_transforms import crop, normalize_image, pad_to_multiple
from kscan.pipelines.segment import (
    SegmentationWarning,
    Segmenter,
    SegSettings,
    input_pairs,
    load_segmenter,
    segment_file,
)
from kscan.pipelines.simulate import VOXEL_SIZE_MM, simulate_dataset
from tests.pipelines.io.test_dicom_read import make_slices, to_enhanced

TINY = {
    "dims": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "depths_decoder": [1, 1, 1, 1],
    "num_classes": 6,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_checkpoint(path, name="vmunet", seed=0, meta=None, **config):
    torch.manual_seed(seed)
    model = registry.build_model(name, {**TINY, **config})
    save_checkpoint(path, name, model, meta=meta)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny 6-class VM-UNet checkpoint."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "vmunet.safetensors")


@pytest.fixture(scope="module")
def model(ckpt):
    net = registry.build_model("vmunet", read_checkpoint(ckpt).config)
    net.load_state_dict(read_checkpoint(ckpt).state)
    return net.eval()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """One simulated volume of 2 slices 64x64: h5/, nifti/, dicom/ (+ SEG)."""
    root = tmp_path_factory.mktemp("sim")
    simulate_dataset(
        root,
        volumes=1,
        slices=2,
        shape_kspace=(64, 64),
        recon_size=(64, 64),
        coils=4,
        quiet=True,
    )
    return root


def _reference_labels(net, volume):
    """Labels of ``(slices, H, W)`` by numpy preprocessing: |x| / 99.5th percentile clipped to
    [0, 4], zero padding centred to multiples of 32, argmax (or sigmoid > 0.5) of the logits."""
    out = []
    for image in np.asarray(volume, dtype=np.float64):
        magnitude = np.abs(image)
        scale = np.percentile(magnitude, 99.5) or magnitude.max()
        x = np.clip(magnitude / scale, 0, 4)
        height, width = x.shape
        ph, pw = -height % 32, -width % 32
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        with torch.no_grad():
            logits = net.forward_logits(torch.tensor(x, dtype=torch.float32)[None, None])[0]
        logits = logits[:, ph // 2 : ph // 2 + height, pw // 2 : pw // 2 + width]
        labels = logits.argmax(0) if logits.shape[0] > 1 else (torch.sigmoid(logits[0]) > 0.5)
        out.append(labels.numpy().astype(np.uint8))
    return np.stack(out)


def _volume(path):
    return nifti_array_to_volume(read_nifti(path).array)


# ---- transforms ----------------------------------------------------------------------------


def test_normalize_image_is_the_robust_max_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 17, 23, generator=gen, dtype=torch.float64) * 40
    x[0, 1] = 0.0  # all zero
    x[1, 0] = 0.0
    x[1, 0, 3, 4] = 7.0  # 99.5th percentile 0: scaled by the maximum
    y = normalize_image(x)
    flat = np.abs(x.numpy()).reshape(6, -1)
    q = np.percentile(flat, 99.5, axis=1, keepdims=True)
    q = np.where(q > 0, q, flat.max(axis=1, keepdims=True))
    expected = np.clip(np.divide(flat, q, out=np.zeros_like(flat), where=q > 0), 0, 4)
    np.testing.assert_allclose(y.numpy().reshape(6, -1), expected, rtol=1e-12, atol=1e-15)
    assert y[0, 1].eq(0).all() and y[1, 0, 3, 4] == 1.0
    above = (y.reshape(6, -1) > 1).sum(1)
    assert (
        above[[1, 2]].eq(0).all() and above[[0, 3, 4, 5]].ge(1).all()
    )  # the brightest keep contrast
    z = x.clone()
    z[0, 0, 0, 0] = 1e6  # an outlier saturates at the ceiling
    assert normalize_image(z)[0, 0, 0, 0] == 4.0


def test_normalize_image_integer_input_and_errors():
    x = torch.arange(64, dtype=torch.int16).reshape(8, 8)
    y = normalize_image(x)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(
        y.numpy(), np.clip(x.numpy() / np.percentile(x.numpy(), 99.5), 0, 4), rtol=1e-6
    )
    bad = torch.ones(4, 8, 8)
    bad[2, 1, 1] = float("nan")
    bad[3, 0, 0] = float("inf")
    with pytest.raises(InvalidDataError, match=r"2 of 4 slices \(slices 2, 3\)"):
        normalize_image(bad)
    with pytest.raises(ShapeError):
        normalize_image(torch.ones(4, 4, dtype=torch.complex64))


@pytest.mark.parametrize("shape", [(50, 70), (64, 96), (1, 33)])
def test_pad_to_multiple_centres_zeros_and_crop_inverts(shape):
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0)) + 1
    padded, window = pad_to_multiple(x, 32)
    height, width = shape
    assert padded.shape[-2] % 32 == 0 and padded.shape[-1] % 32 == 0
    assert padded.shape[-2] - height < 32 and padded.shape[-1] - width < 32
    top, left = (padded.shape[-2] - height) // 2, (padded.shape[-1] - width) // 2
    assert (window[0].start, window[1].start) == (top, left)
    torch.testing.assert_close(crop(padded, window), x, rtol=0, atol=0)
    outside = torch.ones(padded.shape, dtype=torch.bool)
    outside[..., window[0], window[1]] = False
    assert not padded[outside].any()  # the rest is zeros
    if padded.shape == x.shape:
        assert padded is x


# ---- NIfTI, padding, sliding windows ------------------------------------------------------


def test_nifti_in_gives_labels_of_the_model_with_the_input_geometry(tmp_path, ckpt, model, sim):
    src = sim / "nifti" / "sim_000.nii.gz"
    out = tmp_path / "out"
    assert main(["segment", str(src), str(out), "--checkpoint", str(ckpt), "--quiet"]) == 0
    written = read_nifti(out / "sim_000.nii.gz")
    source = read_nifti(src)
    assert written.array.shape == source.array.shape and written.array.dtype == np.uint8
    np.testing.assert_array_equal(written.affine, source.affine)
    expected = _reference_labels(model, nifti_array_to_volume(source.array))
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(nifti_array_to_volume(written.array), expected)
    record = json.loads(sidecar_path(out / "sim_000.nii.gz").read_text())
    assert record["model"] == "vmunet"
    assert record["checkpoint_sha256"] == sha256_file(ckpt)
    assert record["parameters"]["model_config"]["dims"] == TINY["dims"]
    assert record["parameters"]["class_names"]["5"] == TISSUE_CLASSES[5]
    assert not (out / "sim_000_seg.dcm").exists()


def test_a_size_not_multiple_of_32_is_padded_and_cropped_back(tmp_path, ckpt, model, sim):
    volume = _volume(sim / "nifti" / "sim_000.nii.gz")[:, 5:55, :70]  # 50 x 64 -> pad 14, 0
    volume = np.concatenate([volume, volume[:, :, :6]], axis=2)  # 50 x 70
    assert volume.shape[1:] == (50, 70)
    affine = axial_affine(volume.shape, (0.5, 0.5, 3.0))
    src = write_nifti(tmp_path / "odd.nii", volume_to_nifti_array(volume), affine)
    dst = tmp_path / "odd_labels.nii.gz"
    assert main(["segment", str(src), str(dst), "--checkpoint", str(ckpt), "--quiet"]) == 0
    labels = _volume(dst)
    assert labels.shape == volume.shape
    np.testing.assert_array_equal(labels, _reference_labels(model, volume))


def test_sliding_window_equals_the_whole_slice_when_the_window_covers_it(model):
    gen = torch.Generator().manual_seed(1)
    segmenter = Segmenter(model, SegSettings(batch_size=2, overlap=0.25))
    for shape, roi in (((64, 64), (64, 64)), ((50, 70), (64, 96))):
        images = torch.rand(3, *shape, generator=gen)
        direct = segmenter.direct_probabilities(images)
        window = segmenter.sliding_probabilities(images, roi)
        assert window.shape == direct.shape == (3, 6, *shape)
        torch.testing.assert_close(window, direct, rtol=1e-5, atol=1e-6)


def test_slices_larger_than_the_roi_go_through_sliding_windows(model):
    images = torch.rand(2, 96, 80, generator=torch.Generator().manual_seed(2))
    segmenter = Segmenter(model, SegSettings(batch_size=3, roi_size=(64, 64), overlap=0.5))
    probs = segmenter.probabilities(images)
    assert probs.shape == (2, 6, 96, 80)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 96, 80))
    torch.testing.assert_close(probs, segmenter.sliding_probabilities(images, (64, 64)))
    assert not torch.allclose(probs, segmenter.direct_probabilities(images), atol=1e-3)
    with pytest.raises(ConfigError, match="multiples of 32"):
        Segmenter(model, SegSettings(roi_size=(48, 64)))


# ---- other inputs -------------------------------------------------------------------------


def test_dicom_in_gives_a_dicom_seg_of_the_series(tmp_path, ckpt, sim):
    series = sim / "dicom" / "sim_000"
    out = tmp_path / "out"
    assert main(["segment", str(series), str(out), "--checkpoint", str(ckpt), "--quiet"]) == 0
    labels_nifti = read_nifti(out / "sim_000.nii.gz")
    source = read_series(series)
    np.testing.assert_allclose(labels_nifti.affine, source.affine, atol=1e-6)
    labels = nifti_array_to_volume(labels_nifti.array)
    ds = pydicom.dcmread(out / "sim_000_seg.dcm")
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert len(seg.segment_numbers) == len(TISSUE_CLASSES) - 1
    present = sum(len(set(np.unique(s).tolist()) - {0}) for s in labels)
    assert int(ds.NumberOfFrames) == present  # one frame per (slice, segment) present
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.info.uid
    back = read_segmentation(out / "sim_000_seg.dcm")
    by_uid = {
        pydicom.dcmread(f).SOPInstanceUID: k for k, f in enumerate(sorted(series.glob("*.dcm")))
    }
    order = [by_uid[uid] for uid in back.source_sop_instance_uids]
    np.testing.assert_array_equal(back.labels, labels[order])
    assert back.class_names[5] == TISSUE_CLASSES[5]


def test_one_dicom_file_in_gives_its_slice_and_a_seg_of_it(tmp_path, ckpt, model, sim):
    """A single-frame file given alone (any name: found by its preamble) is a one-slice input."""
    series = sim / "dicom" / "sim_000"
    source = tmp_path / "IM0001"  # no suffix, as DICOM files often come
    source.write_bytes(sorted(series.glob("*.dcm"))[1].read_bytes())
    out = tmp_path / "out"
    assert main(["segment", str(source), str(out), "--checkpoint", str(ckpt), "--quiet"]) == 0
    image = read_series(source)
    labels_nifti = read_nifti(out / "IM0001.nii.gz")
    np.testing.assert_allclose(labels_nifti.affine, image.affine, atol=1e-6)
    labels = nifti_array_to_volume(labels_nifti.array)
    np.testing.assert_array_equal(
        labels, _reference_labels(model, nifti_array_to_volume(image.array))
    )
    back = read_segmentation(out / "IM0001_seg.dcm")
    assert back.source_sop_instance_uids == [pydicom.dcmread(source).SOPInstanceUID]
    np.testing.assert_array_equal(back.labels, labels)


def test_an_enhanced_multiframe_file_in_gives_its_volume_and_a_seg_of_its_frames(
    tmp_path, ckpt, model
):
    slices = make_slices(3)
    for k, ds in enumerate(slices):  # different images, so that a swap of frames would show
        pixels = ds.pixel_array.copy()
        pixels[:, : 20 * k] = 0
        ds.PixelData = pixels.tobytes()
    enhanced = to_enhanced(slices, tmp_path / "enhanced.dcm")  # frames in reverse slice order
    out = tmp_path / "out"
    assert main(["segment", str(enhanced), str(out), "--checkpoint", str(ckpt), "--quiet"]) == 0
    volume = nifti_array_to_volume(read_series(enhanced).array)
    assert volume.shape[0] == 3
    labels = nifti_array_to_volume(read_nifti(out / "enhanced.nii.gz").array)
    np.testing.assert_array_equal(labels, _reference_labels(model, volume))
    assert len({labels[k].tobytes() for k in range(3)}) == 3
    back = read_segmentation(out / "enhanced_seg.dcm")
    assert back.source_frame_numbers == [1, 2, 3]
    assert back.source_sop_instance_uids == [pydicom.dcmread(enhanced).SOPInstanceUID] * 3
    np.testing.assert_array_equal(back.labels, labels[::-1])


def test_other_files_are_refused_naming_what_is_expected(tmp_path, ckpt, capsys):
    other = tmp_path / "notes.txt"
    other.write_text("not an image")
    out = tmp_path / "out"
    assert main(["segment", str(other), str(out), "--checkpoint", str(ckpt), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert f"{other}: unknown input; expected a NIfTI, HDF5, PNG, JPEG or DICOM file" in message


def test_h5_reconstructions_in(tmp_path, ckpt, model, sim):
    out = tmp_path / "out"
    h5 = sim / "h5" / "sim_000.h5"
    assert main(["segment", str(h5), str(out), "--checkpoint", str(ckpt), "--quiet"]) == 0
    with h5py.File(h5, "r") as f:
        target = f["reconstruction_rss"][()]
    written = read_nifti(out / "sim_000.nii.gz")
    np.testing.assert_allclose(written.affine, axial_affine(target.shape, VOXEL_SIZE_MM))
    np.testing.assert_allclose(written.affine, read_nifti(sim / "nifti" / "sim_000.nii.gz").affine)
    np.testing.assert_array_equal(
        nifti_array_to_volume(written.array), _reference_labels(model, target)
    )
    recon = tmp_path / "recon.h5"  # kscan reconstruct's layout, no header: 1 mm voxels
    with h5py.File(recon, "w") as f:
        f.create_dataset("reconstruction", data=target[:, :, :48] * 3)
    dst = tmp_path / "recon_labels.nii"
    assert main(["segment", str(recon), str(dst), "--checkpoint", str(ckpt), "--quiet"]) == 0
    written = read_nifti(dst)
    np.testing.assert_allclose(written.affine, axial_affine((2, 64, 48), (1.0, 1.0, 1.0)))
    np.testing.assert_array_equal(
        nifti_array_to_volume(written.array), _reference_labels(model, target[:, :, :48])
    )
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("image", data=target)
    with pytest.raises(FileFormatError, match="no 'reconstruction'"):
        segment_file(
            *load_segmenter(None, ckpt, "cpu", SegSettings()),
            tmp_path / "other.h5",
            tmp_path / "x.nii",
        )


def test_png_in_with_overlay(tmp_path, ckpt, model, sim):
    image = _volume(sim / "nifti" / "sim_000.nii.gz")[1]
    pixels = np.round(np.clip(image / image.max(), 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "slice.png")
    out = tmp_path / "out"
    argv = ["segment", str(tmp_path / "slice.png"), str(out), "--checkpoint", str(ckpt)]
    assert main([*argv, "--overlay", "--quiet"]) == 0
    labels = _volume(out / "slice.nii.gz")
    np.testing.assert_array_equal(labels, _reference_labels(model, pixels[None]))
    overlay = np.asarray(Image.open(out / "slice_overlay.png"))
    assert overlay.shape == (64, 64, 3)
    background = labels[0] == 0
    np.testing.assert_array_equal(overlay[background][:, 0], overlay[background][:, 1])  # grey
    assert (overlay[~background][:, 0] != overlay[~background][:, 1]).any()  # coloured


def test_a_folder_of_inputs_gives_one_output_each(tmp_path, sim):
    pairs = input_pairs(sim / "nifti", tmp_path / "out")
    assert [(p.name, q.name) for p, q in pairs] == [
        ("sim_000.nii.gz", "sim_000.nii.gz"),
        ("sim_000_labels.nii.gz", "sim_000_labels.nii.gz"),
    ]
    pairs = input_pairs(sim / "dicom", tmp_path / "out")  # series folders; the SEG file is skipped
    assert [(p.name, q.name) for p, q in pairs] == [("sim_000", "sim_000.nii.gz")]
    assert input_pairs(sim / "dicom" / "sim_000", tmp_path / "o.nii.gz")[0][0].name == "sim_000"
    with pytest.raises(ConfigError, match="holds 2 inputs"):
        input_pairs(sim / "nifti", tmp_path / "one.nii.gz")


# ---- bad input ----------------------------------------------------------------------------


def test_nan_is_an_error_naming_the_file(tmp_path, ckpt, sim, capsys):
    volume = _volume(sim / "nifti" / "sim_000.nii.gz").copy()
    volume[1, 10, 10] = np.nan
    src = write_nifti(tmp_path / "nan.nii.gz", volume_to_nifti_array(volume), np.eye(4))
    assert (
        main(["segment", str(src), str(tmp_path / "out"), "--checkpoint", str(ckpt), "--quiet"])
        == 2
    )
    message = capsys.readouterr().err
    assert str(src) in message and "NaN or Inf" in message and "slices 1" in message
    assert not (tmp_path / "out" / "nan.nii.gz").exists()


def test_all_zero_slices_are_labelled_0_with_a_warning(tmp_path, ckpt, model, sim, capsys):
    volume = _volume(sim / "nifti" / "sim_000.nii.gz").copy()
    volume[0] = 0
    src = write_nifti(tmp_path / "zero.nii.gz", volume_to_nifti_array(volume), np.eye(4))
    segmenter, checkpoint = load_segmenter("vmunet", ckpt, "cpu", SegSettings())
    with pytest.warns(
        SegmentationWarning, match=r"zero.nii.gz: 1 of 2 slices are all zero \(slices 0\)"
    ):
        out = segment_file(segmenter, checkpoint, src, tmp_path / "zero_labels.nii.gz")
    assert out.empty_slices == [0]
    labels = _volume(out.labels)
    assert not labels[0].any()
    np.testing.assert_array_equal(labels[1], _reference_labels(model, volume[1:])[0])
    assert (
        main(["segment", str(src), str(tmp_path / "cli"), "--checkpoint", str(ckpt), "--quiet"])
        == 0
    )
    assert "kscan: warning:" in capsys.readouterr().err


def test_checkpoints_of_another_model_or_configuration_are_refused(tmp_path, ckpt, monkeypatch):
    settings = SegSettings()
    torch.manual_seed(0)
    model = registry.build_model("vmunet", TINY)
    for change, difference in (
        ({"dims": [16, 32, 64, 128]}, r"vmunet.final_conv.weight has shape \(6, 2, 1, 1\)"),
        ({"depths": [2, 1, 1, 1]}, r"missing.*vmunet.layers.0.blocks.1."),
    ):
        model.config = registry.build_config("vmunet", {**TINY, **change})
        save_checkpoint(tmp_path / "mismatch.safetensors", "vmunet", model)
        with pytest.raises(FileFormatError, match="do not fit the VMUNet.*" + difference):
            load_segmenter("vmunet", tmp_path / "mismatch.safetensors", "cpu", settings)
    save_checkpoint(tmp_path / "recon.safetensors", "varnet", model)  # a reconstruction model
    with pytest.raises(ConfigError, match="holds a reconstruction model"):
        load_segmenter(None, tmp_path / "recon.safetensors", "cpu", settings)
    with pytest.raises(ConfigError, match="holds a 'vmunet' model; --model asks for 'mhs-vm'"):
        load_segmenter("mhs-vm", ckpt, "cpu", settings)
    monkeypatch.setattr(checkpoint_module, "WEIGHTS_DIR", tmp_path / "no_weights")
    with pytest.raises(ConfigError, match="no weights are shipped for model 'vmunet'"):
        load_segmenter("vmunet", None, "cpu", settings)
    with pytest.raises(ConfigError, match="--model: needed without --checkpoint"):
        load_segmenter(None, None, "cpu", settings)


def test_one_class_mhs_vm_with_class_names_from_the_checkpoint(tmp_path, sim):
    path = _tiny_checkpoint(
        tmp_path / "mhs.safetensors",
        "mhs-vm",
        seed=3,
        meta={"class_names": ["background", "body"]},
        num_classes=1,
    )
    net = registry.build_model("mhs-vm", read_checkpoint(path).config)
    net.load_state_dict(read_checkpoint(path).state)
    src = sim / "dicom" / "sim_000"
    out = tmp_path / "out"
    argv = ["segment", str(src), str(out), "--model", "mhs-vm", "--checkpoint", str(path)]
    assert main([*argv, "--quiet"]) == 0
    labels = _volume(out / "sim_000.nii.gz")
    expected = _reference_labels(net.eval(), nifti_array_to_volume(read_series(src).array))
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) <= {0, 1}
    back = read_segmentation(out / "sim_000_seg.dcm")
    assert back.class_names == {1: "body"}
    bad = _tiny_checkpoint(tmp_path / "bad.safetensors", meta={"class_names": ["a", "b"]})
    with pytest.raises(FileFormatError, match="expected 6 names"):
        segment_file(*load_segmenter(None, bad, "cpu", SegSettings()), src, tmp_path / "b.nii")
