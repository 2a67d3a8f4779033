"""fastMRI HDF5 volumes: a lazy slice reader and an atomic writer, in exactly fastMRI's layout.

One file holds one volume::

    kspace               (slices, coils, H, W) complex64   multi-coil; (slices, H, W) single-coil
    reconstruction_rss   (slices, rH, rW) float32          multi-coil target
    reconstruction_esc   (slices, rH, rW) float32          single-coil target
    ismrmrd_header       ISMRMRD XML bytes                 encoding / recon matrix, phase limits
    mask                 (W,) bool                         test-style (undersampled) files only
    segmentation         (slices, h, w) uint8              kscan addition (ATOMMIC's name): labels
    sensitivity_map      like kspace, complex64            kscan addition (ATOMMIC's name)
    attrs: acquisition, max (of the target volume), norm (its L2 norm), patient_id;
           test-style files add acceleration, num_low_frequency

H is the readout, W the phase encode; k-space is centered (``fft2c``). The per-file metadata that
fastMRI derives from the header (encoding size, recon size, padding) is derived the same way
(:mod:`kscan.pipelines.io.ismrmrd_header`). The writer chunks every per-slice dataset by slice, so
the reader's ``f["kspace"][i]`` reads one slice's bytes and nothing else.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import h5py
import numpy as np
import torch

from kscan.errors import ConfigError, FileFormatError, InvalidDataError, ShapeError
from kscan.pipelines.atomic import atomic_path
from kscan.pipelines.io.ismrmrd_header import (
    EncodingGeometry,
    FloatTriple,
    Triple,
    geometry_for_shape,
    header_xml,
    parse_header,
)

KSPACE = "kspace"
HEADER = "ismrmrd_header"
MASK = "mask"
SEGMENTATION = "segmentation"
SENSITIVITY_MAP = "sensitivity_map"
TARGET_KEYS = {"multicoil": "reconstruction_rss", "singlecoil": "reconstruction_esc"}
CHALLENGES = tuple(TARGET_KEYS)

ArrayLike = np.ndarray | torch.Tensor
VolumeFile = TypeVar("VolumeFile", bound="H5VolumeFile")


class H5VolumeFile:
    """An HDF5 volume file held open for reading slices; close it or use it as a context manager.

    Every failure of the file itself (missing, not HDF5, truncated, unreadable data) raises
    :class:`FileFormatError` naming the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder" if self.path.is_dir() else "not found"
            raise FileFormatError(f"{self.path}: {what}; expected an HDF5 file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise FileFormatError(f"{self.path}: not a readable HDF5 file ({err})") from err

    @property
    def num_slices(self) -> int:
        """Number of slices in the volume (from the subclass's ``metadata``)."""
        return self.metadata.num_slices

    def close(self) -> None:
        """Close the HDF5 file (idempotent)."""
        self._file.close()

    def __enter__(self: VolumeFile) -> VolumeFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _dataset(self, key: str) -> h5py.Dataset:
        """The dataset ``key``; a clear error listing the file's keys when there is none."""
        node = self._file.get(key)
        if not isinstance(node, h5py.Dataset):
            raise FileFormatError(
                f"{self.path}: no '{key}' dataset; found {sorted(self._file.keys())}"
            )
        return node

    def _read(self, key: str, selection: int | tuple = ()) -> np.ndarray:
        """``file[key][selection]``; HDF5 read failures (corrupt data) become FileFormatError."""
        try:
            return self._file[key][selection]
        except OSError as err:
            raise FileFormatError(f"{self.path}: cannot read '{key}' ({err})") from err

    def _slice_index(self, index: int, num_slices: int) -> int:
        index = operator.index(index)
        if not 0 <= index < num_slices:
            raise FileFormatError(
                f"{self.path}: slice {index} out of range; the file has {num_slices} slices (0..{num_slices - 1})"
            )
        return index


@dataclass(frozen=True)
class FastMRIMetadata:
    """Per-file metadata: stored shapes, what fastMRI derives from the header, and the attributes.

    ``matrix_size`` is the stored k-space ``(H, W)``; ``encoding_size`` / ``recon_size`` are the
    header's (x, y, z); columns outside ``[padding_left, padding_right)`` were not acquired.
    Attributes that the file lacks are ``None``. ``patient_id`` is deliberately not part of it.
    """

    num_slices: int
    num_coils: int
    matrix_size: tuple[int, int]
    multicoil: bool
    encoding_size: Triple
    recon_size: Triple
    padding_left: int
    padding_right: int
    encoding_fov_mm: FloatTriple | None
    recon_fov_mm: FloatTriple | None
    target_key: str | None
    has_mask: bool
    has_segmentation: bool
    has_sensitivity_map: bool
    acquisition: str | None
    max: float | None
    norm: float | None
    acceleration: float | None
    num_low_frequency: int | None
    centered: bool = True

    @property
    def voxel_size_mm(self) -> tuple[float, float, float]:
        """``(dH, dW, dZ)`` in mm of the recon grid: the header's recon field of view over the recon
        matrix (slice thickness: the field of view's z), or 1 mm where the header has no field of
        view. A centre crop of the recon image keeps this voxel size."""
        if self.recon_fov_mm is None:
            return (1.0, 1.0, 1.0)
        fov_x, fov_y, fov_z = self.recon_fov_mm
        rh, rw = self.recon_size[:2]
        return (fov_x / rh, fov_y / rw, fov_z)

    def as_dict(self) -> dict[str, Any]:
        """The fields that are not ``None`` (so that ``default_collate`` can batch them)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def header_voxel_size_mm(path: str | Path) -> tuple[float, float, float] | None:
    """``(dH, dW, dZ)`` in mm of a fastMRI file's recon grid (:attr:`FastMRIMetadata.voxel_size_mm`)
    when it holds k-space and an ISMRMRD header with a recon field of view; None otherwise (for
    example a file of reconstructions only), when the voxel size is unknown."""
    with h5py.File(path, "r") as f:
        if "kspace" not in f or "ismrmrd_header" not in f:
            return None
    with FastMRIFile(path) as fastmri:
        meta = fastmri.metadata
    return None if meta.recon_fov_mm is None else meta.voxel_size_mm


def _has_kind(dtype: np.dtype, kind: str) -> bool:
    """Whether ``dtype`` holds ``kind`` values: "complex", "real" (floating) or "labels" (integer/bool)."""
    if kind == "labels":
        return np.issubdtype(dtype, np.integer) or dtype == np.bool_
    return np.issubdtype(dtype, {"complex": np.complexfloating, "real": np.floating}[kind])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise FileFormatError(message)


class FastMRIFile(H5VolumeFile):
    """Lazy reader of one fastMRI volume: the file stays open, each call reads only what it needs.

    ``challenge`` ("multicoil" or "singlecoil") requires the matching k-space layout and picks the
    target (``reconstruction_rss`` / ``reconstruction_esc``); ``None`` infers it from the layout.
    Opening validates the layout and parses the header (no array data is read).

    Example::

        with FastMRIFile("file1000001.h5") as f:
            sample = f.read_slice(f.num_slices // 2)   # kspace (coils, H, W) complex64, ...
    """

    def __init__(self, path: str | os.PathLike[str], challenge: str | None = None) -> None:
        if challenge is not None and challenge not in CHALLENGES:
            raise ConfigError(f"challenge: expected one of {CHALLENGES} or None, got {challenge!r}")
        super().__init__(path)
        try:
            self._check_kspace(challenge)
            self._dataset(HEADER)
            raw_header = self._read(HEADER)
            self.header: bytes = (
                raw_header.encode() if isinstance(raw_header, str) else bytes(raw_header)
            )
            self.geometry: EncodingGeometry = parse_header(self.header, str(self.path))
            target_key = TARGET_KEYS["multicoil" if self._multicoil else "singlecoil"]
            self._target_key = target_key if target_key in self._file else None
            self._check_optional()
            self._mask = self._read_mask()
            self.metadata = self._metadata()
        except BaseException:
            self.close()
            raise

    @property
    def attrs(self) -> dict[str, Any]:
        """All HDF5 attributes of the file, including ``patient_id``: never log or print them."""
        return dict(self._file.attrs)

    def _check_kspace(self, challenge: str | None) -> None:
        kspace = self._dataset(KSPACE)
        if not _has_kind(kspace.dtype, "complex"):
            hint = ""
            if kspace.ndim == 4 and kspace.shape[-1] % 2 == 0:
                hint = (
                    "; real/imaginary interleaved on the last axis is the Calgary-Campinas layout "
                    "(kscan.pipelines.io.calgary.CalgaryFile)"
                )
            raise FileFormatError(
                f"{self.path}: 'kspace' has dtype {kspace.dtype}; expected complex64{hint}"
            )
        expected = {"multicoil": (4,), "singlecoil": (3,), None: (3, 4)}[challenge]
        _require(
            kspace.ndim in expected,
            f"{self.path}: 'kspace' has shape {kspace.shape}; expected "
            + " or ".join(
                {3: "(slices, H, W) (single-coil)", 4: "(slices, coils, H, W) (multi-coil)"}[n]
                for n in expected
            ),
        )
        _require(kspace.shape[0] > 0, f"{self.path}: 'kspace' has no slices (shape {kspace.shape})")
        self._multicoil = kspace.ndim == 4
        self._kspace_shape = kspace.shape

    def _check_per_slice(self, key: str, ndim: int, kind: str, layout: str) -> None:
        data = self._dataset(key)
        _require(
            data.ndim == ndim and data.shape[0] == self._kspace_shape[0],
            f"{self.path}: '{key}' has shape {data.shape}; expected {layout} with {self._kspace_shape[0]} slices",
        )
        _require(
            _has_kind(data.dtype, kind),
            f"{self.path}: '{key}' has dtype {data.dtype}; expected {kind} values",
        )

    def _check_optional(self) -> None:
        if self._target_key is not None:
            self._check_per_slice(self._target_key, 3, "real", "(slices, rH, rW)")
        if SEGMENTATION in self._file:
            self._check_per_slice(SEGMENTATION, 3, "labels", "(slices, h, w)")
        if SENSITIVITY_MAP in self._file:
            self._check_per_slice(
                SENSITIVITY_MAP, len(self._kspace_shape), "complex", "the k-space shape"
            )
            maps = self._file[SENSITIVITY_MAP]
            _require(
                maps.shape == self._kspace_shape,
                f"{self.path}: '{SENSITIVITY_MAP}' has shape {maps.shape}; expected the k-space shape {self._kspace_shape}",
            )

    def _read_mask(self) -> np.ndarray | None:
        if MASK not in self._file:
            return None
        mask = self._read(MASK)
        height, width = self._kspace_shape[-2:]
        _require(
            mask.shape in ((width,), (height, width)),
            f"{self.path}: 'mask' has shape {mask.shape}; expected ({width},) or ({height}, {width})",
        )
        return mask != 0

    def _attr(self, name: str, kind: type) -> Any:
        if name not in self._file.attrs:
            return None
        value = self._file.attrs[name]
        if isinstance(value, bytes):
            value = value.decode()
        try:
            return kind(value)
        except (TypeError, ValueError) as err:
            raise FileFormatError(
                f"{self.path}: attribute '{name}' has type {type(value).__name__}; expected {kind.__name__}"
            ) from err

    def _metadata(self) -> FastMRIMetadata:
        geometry = self.geometry
        return FastMRIMetadata(
            num_slices=int(self._kspace_shape[0]),
            num_coils=int(self._kspace_shape[1]) if self._multicoil else 1,
            matrix_size=(int(self._kspace_shape[-2]), int(self._kspace_shape[-1])),
            multicoil=self._multicoil,
            encoding_size=geometry.encoding_size,
            recon_size=geometry.recon_size,
            padding_left=geometry.padding_left,
            padding_right=geometry.padding_right,
            encoding_fov_mm=geometry.encoding_fov_mm,
            recon_fov_mm=geometry.recon_fov_mm,
            target_key=self._target_key,
            has_mask=self._mask is not None,
            has_segmentation=SEGMENTATION in self._file,
            has_sensitivity_map=SENSITIVITY_MAP in self._file,
            acquisition=self._attr("acquisition", str),
            max=self._attr("max", float),
            norm=self._attr("norm", float),
            acceleration=self._attr("acceleration", float),
            num_low_frequency=self._attr("num_low_frequency", int),
        )

    def _coil_axis(self, array: np.ndarray) -> torch.Tensor:
        """Single-coil data gains its coil axis: ``(..., H, W)`` -> ``(..., 1, H, W)``."""
        tensor = torch.from_numpy(array)
        return tensor if self._multicoil else tensor.unsqueeze(-3)

    def _sample(self, selection: int | tuple) -> dict[str, torch.Tensor]:
        sample = {KSPACE: self._coil_axis(self._read(KSPACE, selection))}
        if self._mask is not None:
            sample[MASK] = self.mask
        if self._target_key is not None:
            sample["target"] = torch.from_numpy(self._read(self._target_key, selection))
        if self.metadata.has_segmentation:
            sample[SEGMENTATION] = torch.from_numpy(
                self._read(SEGMENTATION, selection).astype(np.uint8, copy=False)
            )
        if self.metadata.has_sensitivity_map:
            sample[SENSITIVITY_MAP] = self._coil_axis(self._read(SENSITIVITY_MAP, selection))
        return sample

    @property
    def mask(self) -> torch.Tensor | None:
        """The stored sampling mask, ``(W,)`` or ``(H, W)`` bool (the same for every slice), or None."""
        return None if self._mask is None else torch.from_numpy(self._mask.copy())

    def read_slice(self, index: int) -> dict[str, torch.Tensor]:
        """Slice ``index``, reading only that slice from disk.

        Returns ``kspace`` (coils, H, W) complex (coils = 1 for single-coil files) and, when the
        file has them: ``mask`` (W,) or (H, W) bool, ``target`` (rH, rW) float32, ``segmentation``
        (h, w) uint8, ``sensitivity_map`` (coils, H, W) complex.
        """
        return self._sample(self._slice_index(index, self.num_slices))

    def read_volume(self) -> dict[str, torch.Tensor]:
        """The whole volume: the same keys as :meth:`read_slice` with a leading slice axis."""
        return self._sample(())


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ShapeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def _check_array(
    x: np.ndarray, name: str, kind: str, shape: tuple[int | None, ...], layout: str
) -> None:
    """Require the dtype ``kind`` and a shape matching ``shape`` (``None`` matches any size)."""
    if not _has_kind(x.dtype, kind):
        raise ShapeError(f"{name}: expected {kind} values, got dtype {x.dtype}")
    if x.ndim != len(shape) or any(
        s is not None and s != n for s, n in zip(shape, x.shape, strict=True)
    ):
        raise ShapeError(f"{name}: expected shape {layout}, got {tuple(x.shape)}")
    if kind != "labels" and not np.isfinite(x).all():
        raise InvalidDataError(f"{name}: contains NaN or Inf values; expected finite data")


def _header_bytes(
    header: EncodingGeometry | bytes | str | None,
    kspace: np.ndarray,
    target: np.ndarray | None,
    voxel_size_mm: FloatTriple,
    path: Path,
) -> bytes:
    multicoil = kspace.ndim == 4
    num_coils = kspace.shape[1] if multicoil else 1
    if header is None:
        recon_hw = target.shape[-2:] if target is not None else kspace.shape[-2:]
        header = geometry_for_shape(kspace.shape[-2:], recon_hw, voxel_size_mm)
    if isinstance(header, EncodingGeometry):
        return header_xml(header, num_coils=num_coils)
    raw = header.encode() if isinstance(header, str) else bytes(header)
    parse_header(raw, f"{path}: header argument")
    return raw


def _attributes(
    target: np.ndarray | None,
    named: Mapping[str, Any],
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    clashes = sorted(set(extra or {}) & ({"max", "norm", "patient_id"} | set(named)))
    if clashes:
        raise ConfigError(f"attrs: {clashes} have their own arguments; pass them as keywords")
    attrs = dict(extra or {})
    attrs.update({key: value for key, value in named.items() if value is not None})
    if target is not None:
        target64 = target.astype(np.float64)
        attrs["max"] = float(target64.max())
        attrs["norm"] = float(np.linalg.norm(target64))
    return attrs


def _pseudonym(kspace: np.ndarray) -> str:
    """A pseudonymous patient id: the SHA-256 of the stored complex64 k-space bytes."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(kspace)).cast("B")).hexdigest()


def write_fastmri(
    path: str | os.PathLike[str],
    kspace: ArrayLike,
    target: ArrayLike | None = None,
    *,
    header: EncodingGeometry | bytes | str | None = None,
    voxel_size_mm: FloatTriple = (1.0, 1.0, 1.0),
    acquisition: str | None = None,
    patient_id: str | None = None,
    mask: ArrayLike | None = None,
    acceleration: float | None = None,
    num_low_frequency: int | None = None,
    segmentation: ArrayLike | None = None,
    sensitivity_map: ArrayLike | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one volume in fastMRI's layout, atomically (a killed run leaves no partial file).

    Args:
        kspace: ``(slices, coils, H, W)`` (multi-coil) or ``(slices, H, W)`` (single-coil),
            complex, finite; stored as complex64, chunked by slice.
        target: ``(slices, rH, rW)`` real; stored as float32 under ``reconstruction_rss``
            (multi-coil) or ``reconstruction_esc`` (single-coil); sets the attributes ``max`` and
            ``norm`` (max and L2 norm of the whole stored float32 target volume, computed in float64).
        header: ISMRMRD XML (validated by parsing) or an :class:`EncodingGeometry`; ``None``
            derives it from the shapes (:func:`geometry_for_shape`: all columns acquired, recon
            size = the target's (or k-space's) ``(H, W)``, voxels of ``voxel_size_mm``).
        patient_id: stored as given; ``None`` stores a pseudonym, the SHA-256 of the stored
            complex64 k-space bytes (hex).
        mask: ``(W,)`` (fastMRI's test files) or ``(H, W)``; stored as bool.
        segmentation: ``(slices, h, w)`` integer labels in [0, 255], ``(h, w)`` the k-space's
            ``(H, W)`` or the header's recon size; stored as uint8.
        sensitivity_map: complex, the shape of ``kspace``; stored as complex64.
        attrs: further HDF5 attributes (not those with their own argument).

    Returns the path written.
    """
    path = Path(path)
    kspace_np = _to_numpy(kspace, "kspace")
    if kspace_np.ndim not in (3, 4):
        raise ShapeError(
            f"kspace: expected shape (slices, coils, H, W) or (slices, H, W), got {tuple(kspace_np.shape)}"
        )
    _check_array(
        kspace_np, "kspace", "complex", (None,) * kspace_np.ndim, "(slices, [coils,] H, W)"
    )
    if kspace_np.size == 0:
        raise ShapeError(f"kspace: expected a non-empty volume, got shape {tuple(kspace_np.shape)}")
    slices, height, width = kspace_np.shape[0], *kspace_np.shape[-2:]
    datasets = {KSPACE: kspace_np.astype(np.complex64, copy=False)}
    target_np = None
    if target is not None:
        target_np = _to_numpy(target, "target")
        _check_array(target_np, "target", "real", (slices, None, None), f"({slices}, rH, rW)")
        target_np = target_np.astype(np.float32, copy=False)
        datasets[TARGET_KEYS["multicoil" if kspace_np.ndim == 4 else "singlecoil"]] = target_np
    xml = _header_bytes(header, kspace_np, target_np, voxel_size_mm, path)
    if segmentation is not None:
        recon_hw = parse_header(xml, str(path)).recon_size[:2]
        datasets[SEGMENTATION] = _labels(segmentation, slices, (height, width), recon_hw)
    if sensitivity_map is not None:
        maps = _to_numpy(sensitivity_map, "sensitivity_map")
        _check_array(
            maps, "sensitivity_map", "complex", kspace_np.shape, f"{tuple(kspace_np.shape)}"
        )
        datasets[SENSITIVITY_MAP] = maps.astype(np.complex64, copy=False)
    mask_np = None
    if mask is not None:
        mask_np = _to_numpy(mask, "mask")
        if mask_np.shape not in ((width,), (height, width)):
            raise ShapeError(
                f"mask: expected shape ({width},) or ({height}, {width}), got {mask_np.shape}"
            )
    named = {
        "acquisition": acquisition,
        "patient_id": patient_id if patient_id is not None else _pseudonym(datasets[KSPACE]),
        "acceleration": acceleration,
        "num_low_frequency": num_low_frequency,
    }
    attributes = _attributes(target_np, named, attrs)

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, data in datasets.items():  # chunked by slice: f[key][i] reads one chunk
            f.create_dataset(key, data=data, chunks=(1, *data.shape[1:]))
        f.create_dataset(HEADER, data=xml)
        if mask_np is not None:
            f.create_dataset(MASK, data=mask_np != 0)
        f.attrs.update(attributes)
    return path


def _labels(
    segmentation: ArrayLike, slices: int, kspace_hw: tuple[int, int], recon_hw: tuple[int, int]
) -> np.ndarray:
    """Segmentation labels as uint8 ``(slices, h, w)``, checked against the allowed grids."""
    labels = _to_numpy(segmentation, "segmentation")
    _check_array(labels, "segmentation", "labels", (slices, None, None), f"({slices}, h, w)")
    if tuple(labels.shape[-2:]) not in (tuple(kspace_hw), tuple(recon_hw)):
        raise ShapeError(
            f"segmentation: expected (h, w) = the k-space {tuple(kspace_hw)} or recon size {tuple(recon_hw)}, "
            f"got {tuple(labels.shape[-2:])}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ShapeError(
            f"segmentation: labels must lie in [0, 255], got [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.uint8)
