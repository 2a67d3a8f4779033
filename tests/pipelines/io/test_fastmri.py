"""fastMRI HDF5 files: layout facts fastMRI relies on, lazy reads, header geometry and errors."""

from __future__ import annotations

import hashlib
import tracemalloc
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import h5py
import ismrmrd.xsd
import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, FileFormatError, InvalidDataError, ShapeError
from kscan.pipelines.io.fastmri import FastMRIFile, write_fastmri
from kscan.pipelines.io.ismrmrd_header import (
    EncodingGeometry,
    geometry_for_shape,
    header_xml,
    parse_header,
)

RNG = np.random.default_rng(1234)


def _complex(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.normal(size=shape) + 1j * RNG.normal(size=shape)


def _fastmri_query(root: ElementTree.Element, path: list[str]) -> str:
    """fastMRI's ``et_query`` restated: nested ``.//ns:a//ns:b`` lookups in the ISMRMRD namespace."""
    expr = "." + "".join(f"//ismrmrd_namespace:{p}" for p in path)
    return root.find(expr, {"ismrmrd_namespace": "http://www.ismrm.org/ISMRMRD"}).text


def _fastmri_metadata(xml: bytes) -> dict:
    """The metadata fastMRI's SliceDataset derives from a header (mri_data.py)."""
    root = ElementTree.fromstring(xml)
    enc = [int(_fastmri_query(root, ["encoding", "encodedSpace", "matrixSize", a])) for a in "xyz"]
    rec = [int(_fastmri_query(root, ["encoding", "reconSpace", "matrixSize", a])) for a in "xyz"]
    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    center = int(_fastmri_query(root, [*lims, "center"]))
    maximum = int(_fastmri_query(root, [*lims, "maximum"])) + 1
    left = enc[1] // 2 - center
    return {
        "encoding_size": tuple(enc),
        "recon_size": tuple(rec),
        "padding_left": left,
        "padding_right": left + maximum,
    }


@pytest.fixture
def multicoil(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    kspace = _complex((3, 4, 20, 16))
    target = np.abs(RNG.normal(size=(3, 10, 12)))
    path = write_fastmri(
        tmp_path / "file_mc.h5", kspace, target, acquisition="CORPD_FBK", patient_id="secret-id-123"
    )
    return path, kspace, target


def test_layout_matches_fastmri(multicoil: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, kspace, target = multicoil
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"kspace", "reconstruction_rss", "ismrmrd_header"}
        assert f["kspace"].dtype == np.complex64 and f["kspace"].shape == (3, 4, 20, 16)
        assert f["kspace"].chunks == (1, 4, 20, 16)
        assert f["kspace"].id.get_num_chunks() == 3  # one chunk per slice
        assert f["reconstruction_rss"].dtype == np.float32 and f["reconstruction_rss"].shape == (
            3,
            10,
            12,
        )
        np.testing.assert_array_equal(f["kspace"][()], kspace.astype(np.complex64))
        attrs = dict(f.attrs)
        header = f["ismrmrd_header"][()]
    assert attrs["acquisition"] == "CORPD_FBK" and attrs["patient_id"] == "secret-id-123"
    target32 = target.astype(np.float32).astype(np.float64)
    assert attrs["max"] == pytest.approx(target32.max(), rel=1e-12)
    assert attrs["norm"] == pytest.approx(np.sqrt((target32**2).sum()), rel=1e-12)
    assert isinstance(header, bytes)
    assert _fastmri_metadata(header) == {
        "encoding_size": (20, 16, 1),
        "recon_size": (10, 12, 1),
        "padding_left": 0,
        "padding_right": 16,
    }
    parsed = ismrmrd.xsd.CreateFromDocument(header)  # schema-typed parse: valid ISMRMRD
    assert parsed.encoding[0].encodedSpace.matrixSize.y == 16
    assert parsed.acquisitionSystemInformation.receiverChannels == 4


def test_read_slice_and_volume(multicoil: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, kspace, target = multicoil
    with FastMRIFile(path) as f:
        meta = f.metadata
        assert (f.num_slices, meta.num_coils, meta.matrix_size, meta.multicoil) == (
            3,
            4,
            (20, 16),
            True,
        )
        assert (meta.encoding_size, meta.recon_size, meta.padding_left, meta.padding_right) == (
            (20, 16, 1),
            (10, 12, 1),
            0,
            16,
        )
        assert (
            meta.target_key == "reconstruction_rss"
            and meta.acquisition == "CORPD_FBK"
            and meta.centered
        )
        assert not (meta.has_mask or meta.has_segmentation or meta.has_sensitivity_map)
        sample = f.read_slice(2)
        assert set(sample) == {"kspace", "target"}
        assert sample["kspace"].dtype == torch.complex64 and sample["target"].dtype == torch.float32
        np.testing.assert_array_equal(sample["kspace"].numpy(), kspace[2].astype(np.complex64))
        np.testing.assert_array_equal(sample["target"].numpy(), target[2].astype(np.float32))
        volume = f.read_volume()
        np.testing.assert_array_equal(volume["kspace"].numpy(), kspace.astype(np.complex64))
        assert "patient_id" not in meta.as_dict() and f.attrs["patient_id"] == "secret-id-123"


def test_one_slice_is_read_without_the_volume(tmp_path: Path) -> None:
    kspace = _complex((8, 4, 64, 48)).astype(np.complex64)
    path = write_fastmri(tmp_path / "lazy.h5", kspace)
    with FastMRIFile(path) as f:
        tracemalloc.start()
        sample = f.read_slice(5)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    slice_bytes = kspace[5].nbytes
    assert peak < 3 * slice_bytes < kspace.nbytes
    np.testing.assert_array_equal(sample["kspace"].numpy(), kspace[5])


def test_single_coil_file(tmp_path: Path) -> None:
    kspace = _complex((2, 12, 10))
    target = np.abs(RNG.normal(size=(2, 8, 8))).astype(np.float32)
    path = write_fastmri(tmp_path / "sc.h5", torch.from_numpy(kspace), torch.from_numpy(target))
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"kspace", "reconstruction_esc", "ismrmrd_header"}
        assert f["kspace"].shape == (2, 12, 10)
    with FastMRIFile(path, challenge="singlecoil") as f:
        assert not f.metadata.multicoil and f.metadata.num_coils == 1
        sample = f.read_slice(1)
        assert sample["kspace"].shape == (1, 12, 10)  # kscan's (coils, H, W)
        np.testing.assert_array_equal(sample["kspace"][0].numpy(), kspace[1].astype(np.complex64))
        np.testing.assert_array_equal(sample["target"].numpy(), target[1])
    with pytest.raises(FileFormatError, match=r"sc\.h5.*expected \(slices, coils, H, W\)"):
        FastMRIFile(path, challenge="multicoil")


def test_test_style_file_with_mask(tmp_path: Path) -> None:
    mask = np.zeros(16, dtype=bool)
    mask[[0, 4, 7, 8, 9, 12]] = True
    path = write_fastmri(
        tmp_path / "test.h5",
        _complex((2, 3, 20, 16)),
        mask=mask.astype(np.float32),
        acceleration=4,
        num_low_frequency=3,
    )
    with h5py.File(path, "r") as f:
        assert f["mask"].dtype == np.bool_ and f["mask"].shape == (16,)
        assert f.attrs["acceleration"] == 4 and f.attrs["num_low_frequency"] == 3
        assert "max" not in f.attrs and "norm" not in f.attrs and "reconstruction_rss" not in f
    with FastMRIFile(path) as f:
        meta = f.metadata
        assert (
            meta.has_mask
            and meta.acceleration == 4.0
            and meta.num_low_frequency == 3
            and meta.max is None
        )
        assert meta.target_key is None
        sample = f.read_slice(0)
        assert sample["mask"].dtype == torch.bool
        np.testing.assert_array_equal(sample["mask"].numpy(), mask)


def test_segmentation_and_sensitivity_map(tmp_path: Path) -> None:
    kspace = _complex((2, 3, 20, 16))
    maps = _complex((2, 3, 20, 16))
    labels = RNG.integers(0, 5, size=(2, 10, 12))
    target = np.ones((2, 10, 12))
    path = write_fastmri(
        tmp_path / "seg.h5", kspace, target, segmentation=labels, sensitivity_map=maps
    )
    with h5py.File(path, "r") as f:
        assert f["segmentation"].dtype == np.uint8 and f["segmentation"].chunks == (1, 10, 12)
        assert f["sensitivity_map"].dtype == np.complex64 and f["sensitivity_map"].shape == (
            2,
            3,
            20,
            16,
        )
    with FastMRIFile(path) as f:
        assert f.metadata.has_segmentation and f.metadata.has_sensitivity_map
        sample = f.read_slice(1)
    np.testing.assert_array_equal(sample["segmentation"].numpy(), labels[1])
    np.testing.assert_array_equal(sample["sensitivity_map"].numpy(), maps[1].astype(np.complex64))
    with pytest.raises(ShapeError, match="segmentation"):
        write_fastmri(tmp_path / "bad.h5", kspace, target, segmentation=labels[:, :9])
    with pytest.raises(ShapeError, match=r"\[0, 255\]"):
        write_fastmri(tmp_path / "bad.h5", kspace, target, segmentation=labels + 300)
    assert not (tmp_path / "bad.h5").exists()


def test_header_geometry_with_padding(tmp_path: Path) -> None:
    geometry = EncodingGeometry(
        encoding_size=(20, 24, 1),
        recon_size=(10, 10, 1),
        phase_limits=(0, 19, 10),
        encoding_fov_mm=(200.0, 240.0, 3.0),
        recon_fov_mm=(100.0, 100.0, 3.0),
    )
    assert (geometry.padding_left, geometry.padding_right) == (2, 22)
    path = write_fastmri(tmp_path / "pad.h5", _complex((1, 2, 20, 24)), header=geometry)
    with FastMRIFile(path) as f:
        assert (f.metadata.padding_left, f.metadata.padding_right) == (2, 22)
        assert f.metadata.recon_fov_mm == (100.0, 100.0, 3.0)
        assert _fastmri_metadata(f.header)["padding_right"] == 22
    assert parse_header(header_xml(geometry), "x") == geometry
    xml = header_xml(geometry).decode()  # a str header is accepted as well
    write_fastmri(tmp_path / "str.h5", _complex((1, 2, 20, 24)), header=xml)


def test_geometry_for_shape_fov() -> None:
    geometry = geometry_for_shape((640, 368), (320, 320), voxel_size_mm=(0.5, 0.4, 3.0))
    assert geometry.encoding_fov_mm == pytest.approx((320.0, 147.2, 3.0))
    assert geometry.recon_fov_mm == pytest.approx((160.0, 128.0, 3.0))
    assert (geometry.padding_left, geometry.padding_right) == (0, 368)


def test_default_patient_id_is_a_content_hash(tmp_path: Path) -> None:
    kspace = _complex((1, 2, 8, 8))
    path = write_fastmri(tmp_path / "anon.h5", kspace)
    with h5py.File(path, "r") as f:
        expected = hashlib.sha256(kspace.astype(np.complex64).tobytes()).hexdigest()
        assert f.attrs["patient_id"] == expected


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vol.h5"
    write_fastmri(path, _complex((1, 2, 8, 8)), acquisition="OLD")
    original = path.read_bytes()
    real_create = h5py.Group.create_dataset

    def failing_create(self, name, *args, **kwargs):  # fail after k-space is on disk
        if name == "ismrmrd_header":
            raise KeyboardInterrupt
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(KeyboardInterrupt):
        write_fastmri(path, _complex((1, 2, 8, 8)), acquisition="NEW")
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.h5"]


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    with pytest.raises(ShapeError, match="kspace: expected complex"):
        write_fastmri(out, RNG.normal(size=(1, 2, 8, 8)))
    with pytest.raises(ShapeError, match="kspace: expected shape"):
        write_fastmri(out, _complex((8, 8)))
    bad = _complex((1, 2, 8, 8))
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidDataError, match="NaN"):
        write_fastmri(out, bad)
    with pytest.raises(ShapeError, match=r"target: expected shape \(2, rH, rW\)"):
        write_fastmri(out, _complex((2, 2, 8, 8)), np.ones((3, 4, 4)))
    with pytest.raises(ShapeError, match="mask"):
        write_fastmri(out, _complex((1, 2, 8, 8)), mask=np.ones(7))
    with pytest.raises(FileFormatError, match="header argument.*not valid XML"):
        write_fastmri(out, _complex((1, 2, 8, 8)), header=b"<ismrmrdHeader")
    with pytest.raises(ConfigError, match="max"):
        write_fastmri(out, _complex((1, 2, 8, 8)), attrs={"max": 1.0})
    assert not out.exists()


def _copy_with(tmp_path: Path, source: Path, name: str, edit) -> Path:
    """A copy of ``source`` with ``edit(h5py.File)`` applied."""
    path = tmp_path / name
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _replace(key: str, data) -> callable:
    def edit(f: h5py.File) -> None:
        del f[key]
        f.create_dataset(key, data=data)

    return edit


def test_read_errors_name_the_file(
    tmp_path: Path, multicoil: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    good, kspace, _ = multicoil
    header = FastMRIFile(good).header
    cases = {
        "missing.h5": (None, "not found"),
        "text.h5": ("text", "not a readable HDF5 file"),
        "truncated.h5": ("truncated", "not a readable HDF5 file"),
        "nokspace.h5": (
            lambda f: f.__delitem__("kspace"),
            r"no 'kspace' dataset; found \['ismrmrd_header', 'reconstruction_rss'\]",
        ),
        "float.h5": (
            _replace("kspace", np.ones((3, 4, 20, 16), np.float32)),
            "dtype float32; expected complex64",
        ),
        "ndim.h5": (
            _replace("kspace", kspace[0, 0].astype(np.complex64)),
            r"shape \(20, 16\); expected",
        ),
        "noheader.h5": (lambda f: f.__delitem__("ismrmrd_header"), "no 'ismrmrd_header' dataset"),
        "badxml.h5": (
            _replace("ismrmrd_header", b"<ismrmrdHeader><encoding>"),
            "ismrmrd_header is not valid XML",
        ),
        "nofield.h5": (
            _replace(
                "ismrmrd_header",
                header.replace(b"<reconSpace>", b"<reconSpaceX>").replace(
                    b"</reconSpace>", b"</reconSpaceX>"
                ),
            ),
            "ismrmrd_header has no encoding/reconSpace/matrixSize/x",
        ),
        "notint.h5": (
            _replace("ismrmrd_header", header.replace(b"<x>20</x>", b"<x>twenty</x>")),
            "expected int",
        ),
        "target.h5": (
            _replace("reconstruction_rss", np.ones((2, 10, 12), np.float32)),
            "'reconstruction_rss' has shape",
        ),
    }
    for name, (edit, message) in cases.items():
        path = tmp_path / name
        if edit == "text":
            path.write_text("not hdf5")
        elif edit == "truncated":
            data = good.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif edit is not None:
            path = _copy_with(tmp_path, good, name, edit)
        with pytest.raises(FileFormatError, match=message) as info:
            FastMRIFile(path)
        assert str(path) in str(info.value)
        assert "secret-id-123" not in str(info.value)


def test_corrupt_slice_data(tmp_path: Path, multicoil: tuple[Path, np.ndarray, np.ndarray]) -> None:
    """A checksummed chunk whose bytes were damaged on disk: reading that slice fails clearly."""
    kspace = multicoil[1].astype(np.complex64)

    def checksummed(f: h5py.File) -> None:
        del f["kspace"]
        f.create_dataset("kspace", data=kspace, chunks=(1, *kspace.shape[1:]), fletcher32=True)

    path = _copy_with(tmp_path, multicoil[0], "corrupt.h5", checksummed)
    with h5py.File(path, "r") as f:
        offset = f["kspace"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset + 100)
        raw.write(b"\xff" * 8)
    with FastMRIFile(path) as f:
        f.read_slice(0)
        with pytest.raises(FileFormatError, match=r"corrupt\.h5: cannot read 'kspace'"):
            f.read_slice(1)


def test_calgary_layout_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "cc.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=np.zeros((2, 8, 6, 4), np.float32))
    with pytest.raises(FileFormatError, match="Calgary-Campinas layout"):
        FastMRIFile(path)


def test_slice_index_out_of_range(multicoil: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, _ = multicoil
    with FastMRIFile(path) as f:
        for index in (3, -1):
            with pytest.raises(
                FileFormatError,
                match=rf"file_mc\.h5: slice {index} out of range; the file has 3 slices",
            ):
                f.read_slice(index)
    with pytest.raises(ConfigError, match="challenge"):
        FastMRIFile(path, challenge="dualcoil")
