"""Reading MRD (ISMRMRD HDF5) raw data: files written here with the ismrmrd package itself.

The k-space placed by the reader is compared with the source exactly; the centering convention is
checked against a direct DFT of a phantom (no FFT from kscan involved in making the data).
"""

from __future__ import annotations

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest
import torch

from kscan.errors import FileFormatError
from kscan.physics.coils import reduce
from kscan.physics.fft import ifft2c
from kscan.pipelines.io.fastmri import FastMRIFile
from kscan.pipelines.io.mrd import mrd_to_fastmri, read_mrd
from kscan.pipelines.synthetic import birdcage_maps, shepp_logan, simulate_multicoil

H, W, COILS = 32, 24, 4  # readout (2x oversampled: recon x is 16), phase encode, coils


def _header(
    encoded: tuple[int, int, int] = (H, W, 1),
    center_1: int = W // 2,
    step_2: tuple[int, int] | None = None,
    trajectory: str = "cartesian",
    calibration: str | None = None,
) -> xsd.ismrmrdHeader:
    """A header with encodedSpace ``encoded``, step-1 limits ``0..W-1`` centred at ``center_1``."""
    x, y, z = encoded
    space = lambda mx, fov: xsd.encodingSpaceType(  # noqa: E731
        matrixSize=xsd.matrixSizeType(x=mx, y=y, z=z),
        fieldOfView_mm=xsd.fieldOfViewMm(x=fov, y=200.0, z=5.0),
    )
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=y - 1, center=center_1),
        kspace_encoding_step_2=(
            xsd.limitType(minimum=0, maximum=step_2[0], center=step_2[1]) if step_2 else None
        ),
    )
    parallel = None
    if calibration is not None:
        parallel = xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(
                kspace_encoding_step_1=2, kspace_encoding_step_2=1
            ),
            calibrationMode=xsd.calibrationModeType(calibration),
        )
    encoding = xsd.encodingType(
        encodedSpace=space(x, 400.0),
        reconSpace=space(x // 2, 200.0),
        encodingLimits=limits,
        trajectory=xsd.trajectoryType(trajectory),
        parallelImaging=parallel,
    )
    conditions = xsd.experimentalConditionsType(H1resonanceFrequency_Hz=127_000_000)
    return xsd.ismrmrdHeader(experimentalConditions=conditions, encoding=[encoding])


def _acq(
    data: np.ndarray,
    step_1: int,
    center_sample: int | None = None,
    flags: tuple[int, ...] = (),
    trajectory: np.ndarray | None = None,
    **idx: int,
) -> ismrmrd.Acquisition:
    """An acquisition of ``data`` ``(coils, samples)`` at ``kspace_encode_step_1 = step_1``."""
    data = np.ascontiguousarray(data, dtype=np.complex64)
    acq = ismrmrd.Acquisition.from_array(
        data,
        trajectory,
        center_sample=data.shape[1] // 2 if center_sample is None else center_sample,
    )
    acq.idx.kspace_encode_step_1 = step_1
    for name, value in idx.items():
        setattr(acq.idx, name, value)
    for flag in flags:
        acq.set_flag(flag)
    return acq


def _noise_scan() -> ismrmrd.Acquisition:
    noise = np.random.default_rng(9).standard_normal((COILS, H)) * 100
    return _acq(noise, 0, flags=(ismrmrd.ACQ_IS_NOISE_MEASUREMENT,))


def _write(path, header: xsd.ismrmrdHeader, acquisitions: list[ismrmrd.Acquisition]):
    """Write an MRD file with ismrmrd's File API (one HDF5 write for all acquisitions)."""
    with ismrmrd.File(path, mode="w") as f:
        f["dataset"].header = header
        if acquisitions:
            f["dataset"].acquisitions = acquisitions
    return path


def _lines(kspace: torch.Tensor, lines, **idx: int) -> list[ismrmrd.Acquisition]:
    """One acquisition per phase-encode line of centered ``kspace`` ``(coil, H, W)`` (centre W // 2)."""
    return [_acq(kspace[:, :, w].numpy(), w, **idx) for w in lines]


def _shuffled(items: list, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def test_slices_and_repetitions_are_placed_exactly(tmp_path):
    # Four distinct volumes (slice s, repetition r), lines in random order, a noise scan first.
    phantoms = {
        (s, r): simulate_multicoil((H, W), COILS, noise=0.01, seed=10 * s + r)
        for s in (0, 1)
        for r in (0, 1)
    }
    acqs = [
        a
        for (s, r), p in phantoms.items()
        for a in _lines(p.kspace, range(W), slice=s, repetition=r)
    ]
    path = _write(tmp_path / "scan.h5", _header(), [_noise_scan(), *_shuffled(acqs, 0)])

    data = read_mrd(path)
    expected = torch.stack([torch.stack([phantoms[s, r].kspace for r in (0, 1)]) for s in (0, 1)])
    assert data.kspace.shape == (2, 2, COILS, H, W) and data.kspace.dtype == torch.complex64
    assert torch.equal(data.kspace, expected)  # every sample back, noise scan not averaged in
    assert data.mask.shape == (2, 2, W) and bool(data.mask.all())
    meta = data.metadata
    assert meta.skipped == {"noise": 1}
    assert (meta.slices, meta.repetitions, meta.num_coils) == ((0, 1), (0, 1), COILS)
    assert (meta.encoding_size, meta.recon_size) == ((H, W, 1), (H // 2, W, 1))
    assert data.header.encoding[0].encodedSpace.matrixSize.y == W

    one = read_mrd(path, repetition=1)
    assert one.kspace.shape == (2, COILS, H, W) and one.metadata.repetitions == (1,)
    assert torch.equal(one.kspace, expected[:, 1])

    # SENSE coil combination of the centered inverse FFT recovers the phantom (to the noise level).
    for s, r in phantoms:
        p = phantoms[s, r]
        image = reduce(ifft2c(data.kspace[s, r]), p.maps)
        error = (image - p.image).norm() / p.image.norm()
        assert float(error) < 0.03


def _dft(image: np.ndarray, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Signal ``sum_xy m(x, y) exp(-2 pi i (kx x / H + ky y / W)) / sqrt(H W)`` with the origin at
    pixel ``(H // 2, W // 2)``, for integer frequencies ``kx`` (rows) and ``ky`` (columns)."""
    h, w = image.shape[-2:]
    ex = np.exp(-2j * np.pi * np.outer(kx, np.arange(h) - h // 2) / h)
    ey = np.exp(-2j * np.pi * np.outer(np.arange(w) - w // 2, ky) / w)
    return ex @ image @ ey / np.sqrt(h * w)


@pytest.mark.parametrize("shape", [(20, 16), (21, 15)])
def test_centering_matches_a_direct_dft(tmp_path, shape):
    # MRD semantics: sample s of a readout is kx = s - center_sample, line e1 is ky = e1 - center.
    h, w = shape
    center_1 = 5  # lines 0..w-1 hold ky = -5 .. w-6, so they land at W index e1 - 5 + w // 2
    coils = (
        birdcage_maps(2, shape, dtype=torch.complex128) * shepp_logan(shape, dtype=torch.complex128)
    ).numpy()
    center_sample = (
        6  # asymmetric echo: kx = -6 .. h - h // 2 - 1, the rest of the readout is missing
    )
    kx = np.arange(h - h // 2 + center_sample) - center_sample
    acqs, ky = [], []
    for e1 in range(w):
        if not 0 <= e1 - center_1 + w // 2 < w:
            continue  # beyond the encoded matrix: not acquired (partial Fourier)
        ky.append(e1 - center_1)
        acqs.append(_acq(np.stack([_dft(c, kx, [ky[-1]])[:, 0] for c in coils]), e1, center_sample))
    path = _write(tmp_path / "dft.h5", _header((h, w, 1), center_1=center_1), acqs)

    data = read_mrd(path, repetition=0)
    kspace = data.kspace[0].to(torch.complex128)
    rows, columns = kx + h // 2, np.array(ky) + w // 2
    assert data.mask[0].nonzero().flatten().tolist() == columns.tolist()
    full = _dft(coils, np.arange(h) - h // 2, np.arange(w) - w // 2)
    expected = np.zeros_like(full)
    expected[:, rows[:, None], columns] = full[:, rows[:, None], columns]
    torch.testing.assert_close(kspace, torch.from_numpy(expected), atol=1e-5, rtol=1e-5)

    # With every line and sample acquired, the centered inverse FFT gives back the coil images.
    acqs = [
        _acq(
            np.stack([_dft(c, np.arange(h) - h // 2, [k])[:, 0] for c in coils]), k + w // 2, h // 2
        )
        for k in range(-(w // 2), w - w // 2)
    ]
    path = _write(tmp_path / "full.h5", _header((h, w, 1), center_1=w // 2), acqs)
    image = ifft2c(read_mrd(path).kspace[0, 0].to(torch.complex128))
    torch.testing.assert_close(image, torch.from_numpy(coils), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("calibration", [None, "separate", "embedded"])
def test_undersampled_lines_and_calibration(tmp_path, calibration):
    # Every other line acquired, plus calibration-only lines at the odd centre lines.
    phantom = simulate_multicoil((H, W), COILS, noise=0.0, seed=3)
    even, acs = list(range(0, W, 2)), [W // 2 - 1, W // 2 + 1]
    acqs = _lines(phantom.kspace, even) + [
        _acq(phantom.kspace[:, :, w].numpy(), w, flags=(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,))
        for w in acs
    ]
    path = _write(
        tmp_path / "r2.h5", _header(calibration=calibration), [_noise_scan(), *_shuffled(acqs, 1)]
    )

    data = read_mrd(path, repetition=0)
    lines = sorted(even + acs) if calibration == "embedded" else even
    expected_mask = torch.zeros(W, dtype=torch.bool)
    expected_mask[lines] = True
    assert data.mask.shape == (1, W) and torch.equal(data.mask[0], expected_mask)
    assert torch.equal(data.kspace[0], phantom.kspace * expected_mask)
    skipped = {"noise": 1} if calibration == "embedded" else {"noise": 1, "calibration": len(acs)}
    assert data.metadata.skipped == skipped


def test_averages_are_averaged_and_dataset_api_files_read(tmp_path):
    # Written with the classic ismrmrd.Dataset API; line 1 acquired twice (average 0 and 1).
    path = tmp_path / "avg.h5"
    ds = ismrmrd.Dataset(str(path), mode="w")
    ds.write_xml_header(xsd.ToXML(_header((8, 4, 1), center_1=2)))
    a, b = np.full((2, 8), 1 + 2j), np.full((2, 8), 3 - 4j)
    for acq in [_acq(a, 0), _acq(a, 1, average=0), _acq(b, 1, average=1), _acq(b, 3)]:
        ds.append_acquisition(acq)
    ds.close()

    data = read_mrd(path, repetition=0)
    k = data.kspace[0]
    assert torch.equal(data.mask[0], torch.tensor([True, True, False, True]))
    assert torch.equal(k[:, :, 1], torch.full((2, 8), 2 - 1j, dtype=torch.complex64))
    assert torch.equal(k[:, :, 0], torch.from_numpy(a.astype(np.complex64)))
    assert float(k[:, :, 2].abs().max()) == 0.0


def test_3d_partitions_contrasts_and_phases(tmp_path):
    # 3D: kspace_encode_step_2 0..3 with centre 2 on a z = 4 grid; two contrasts, the second chosen.
    z = 4
    source = torch.randn(
        2, z, COILS, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.complex64
    )
    acqs = [
        _acq(source[c, p, :, :, w].numpy(), w, kspace_encode_step_2=p, contrast=c)
        for c in (0, 1)
        for p in range(z)
        for w in range(W)
    ]
    path = _write(
        tmp_path / "3d.h5", _header((H, W, z), step_2=(z - 1, z // 2)), _shuffled(acqs, 2)
    )

    data = read_mrd(path, contrast=1)
    assert data.kspace.shape == (1, 1, z, COILS, H, W) and data.mask.shape == (1, 1, z, W)
    assert torch.equal(data.kspace[0, 0], source[1])
    assert data.metadata.contrasts == (0, 1) and data.metadata.phases == (0,)
    with pytest.raises(FileFormatError, match=r"contrast 2 not in the data; found \[0, 1\]"):
        read_mrd(path, contrast=2)


def test_convert_to_fastmri(tmp_path):
    phantoms = [simulate_multicoil((H, W), COILS, noise=0.01, seed=s) for s in range(3)]
    acqs = [
        a
        for s, p in enumerate(phantoms[:2])
        for a in _lines(p.kspace, range(W), slice=s, repetition=1)
    ]
    header = _header()
    header.subjectInformation = xsd.subjectInformationType(
        patientName="Doe^Jane", patientID="P-1234"
    )
    source = _write(
        tmp_path / "scan.h5", header, [_noise_scan(), *_lines(phantoms[2].kspace, range(W)), *acqs]
    )

    out = mrd_to_fastmri(source, tmp_path / "out" / "file1.h5", repetition=1)
    with FastMRIFile(out) as f:
        volume, meta, xml = f.read_volume(), f.metadata, f.header
    expected = torch.stack([p.kspace for p in phantoms[:2]])
    assert torch.equal(volume["kspace"], expected) and "mask" not in volume
    # fastMRI's target, computed here with numpy: RSS of the centered inverse FFT, centre crop.
    images = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(expected.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    rss = np.sqrt((np.abs(images) ** 2).sum(axis=1))
    top = (H - H // 2) // 2
    np.testing.assert_allclose(
        volume["target"].numpy(), rss[:, top : top + H // 2, :], rtol=1e-5, atol=1e-6
    )
    assert (meta.encoding_size, meta.recon_size) == ((H, W, 1), (H // 2, W, 1))
    assert (meta.padding_left, meta.padding_right) == (0, W)
    assert b"Doe" not in xml and b"P-1234" not in xml

    # Every other line: a test-style file with the mask and no target.
    undersampled = _write(tmp_path / "r2.h5", _header(), _lines(phantoms[0].kspace, range(0, W, 2)))
    with FastMRIFile(mrd_to_fastmri(undersampled, tmp_path / "r2_fastmri.h5")) as f:
        volume = f.read_volume()
    assert volume["mask"].tolist() == [w % 2 == 0 for w in range(W)] and "target" not in volume
    assert torch.equal(volume["kspace"][0], phantoms[0].kspace * volume["mask"])


def _assert_one_line(err: pytest.ExceptionInfo, path, text: str) -> None:
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and text in message


def test_bad_files(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(FileFormatError) as err:
        read_mrd(text)
    _assert_one_line(err, text, "not a readable HDF5")

    other = tmp_path / "fastmri.h5"
    with h5py.File(other, "w") as f:
        f["kspace"] = np.zeros((1, 4, 4), np.complex64)
    with pytest.raises(FileFormatError) as err:
        read_mrd(other)
    _assert_one_line(err, other, "no MRD group 'dataset'")

    empty = _write(tmp_path / "empty.h5", _header(), [])
    with pytest.raises(FileFormatError) as err:
        read_mrd(empty)
    _assert_one_line(err, empty, "no acquisitions")

    noise_only = _write(tmp_path / "noise.h5", _header(), [_noise_scan()])
    with pytest.raises(FileFormatError) as err:
        read_mrd(noise_only)
    _assert_one_line(err, noise_only, "no imaging acquisitions")

    with pytest.raises(FileFormatError) as err:
        read_mrd(tmp_path / "missing.h5")
    _assert_one_line(err, tmp_path / "missing.h5", "not found")


def test_non_cartesian_and_misplaced_data(tmp_path):
    line = np.ones((COILS, H))
    radial = _write(tmp_path / "radial.h5", _header(trajectory="radial"), [_acq(line, 0)])
    with pytest.raises(FileFormatError) as err:
        read_mrd(radial)
    _assert_one_line(err, radial, "radial trajectory")

    traj = np.zeros((H, 2), np.float32)
    with_traj = _write(tmp_path / "traj.h5", _header(), [_acq(line, 0, trajectory=traj)])
    with pytest.raises(FileFormatError) as err:
        read_mrd(with_traj)
    _assert_one_line(err, with_traj, "2-D trajectory")

    outside = _write(tmp_path / "outside.h5", _header(center_1=2), [_acq(line, W - 1)])
    with pytest.raises(FileFormatError) as err:
        read_mrd(outside)
    _assert_one_line(err, outside, "outside the encoded matrix")

    bad_xml = _write(tmp_path / "xml.h5", _header(), [_acq(line, 0)])
    with h5py.File(bad_xml, "r+") as f:
        f["dataset/xml"][0] = b"<ismrmrdHeader><broken"
    with pytest.raises(FileFormatError) as err:
        read_mrd(bad_xml)
    _assert_one_line(err, bad_xml, "header does not parse")
