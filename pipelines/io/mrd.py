"""ISMRMRD / MRD raw data (HDF5) of Cartesian acquisitions, read into kscan's k-space layout.

An MRD file holds an XML header and a list of acquisitions (readouts). Each acquisition carries
``(coils, samples)`` complex samples and encoding counters (``idx``). The reader, built on the
``ismrmrd`` package (:class:`ismrmrd.File` reads every acquisition in one HDF5 call), puts each
imaging readout on the grid of encoding ``e`` (``encoding=0`` by default) of the header:

- **phase encode** (W): ``w = kspace_encode_step_1 - center_1 + W // 2`` with ``W`` =
  ``encodedSpace.matrixSize.y`` and ``center_1`` = ``encodingLimits.kspace_encoding_step_1.center``
  (``w = kspace_encode_step_1`` when the header has no such limit). A partially sampled or partial
  Fourier acquisition therefore lands where its lines belong, with the echo centre at ``W // 2``;
  fastMRI's ``padding_left = W // 2 - center_1`` is the same offset.
- **partition** (3D, ``encodedSpace.matrixSize.z > 1``): ``z = kspace_encode_step_2 - center_2 + Z // 2``.
- **readout** (H): sample ``s`` of an acquisition goes to ``h = s - center_sample + H // 2``, where
  ``H`` is ``encodedSpace.matrixSize.x`` or the longest acquisition if that is longer. The readout
  oversampling is kept as acquired (fastMRI keeps its 2x oversampled readout, 640 for 320 mm). The
  ``discard_pre`` first and ``discard_post`` last samples are left out (zero).

**Centering.** In MRD the samples of a readout are in acquisition order with the echo (k = 0) at
``center_sample``, and line ``center_1`` is k = 0 in phase. Putting k = 0 at index ``n // 2`` on
both axes is exactly kscan's (and fastMRI's) centered convention, so no FFT shift is applied:
``kscan.physics.fft.ifft2c(kspace)`` gives the coil images with the object centred (tested against a
direct DFT of a phantom in ``tests/pipelines/io/test_mrd.py``).

**Skipped acquisitions** (counted in :attr:`MrdMetadata.skipped`): noise measurements
(``ACQ_IS_NOISE_MEASUREMENT``), navigators, phase-correction readouts, HP and real-time feedback,
dummy scans, surface-coil correction scans, phase stabilisation and its reference, readouts of
another encoding space, and parallel-imaging calibration-only lines (``ACQ_IS_PARALLEL_CALIBRATION``)
unless the header's ``calibrationMode`` is ``embedded``: embedded calibration lines lie on the
imaging grid and are kept (lines flagged ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING`` always are).

**Dimensions.** Output slices are the ``idx.slice`` values present, in order; repetitions the
``idx.repetition`` values present (one axis, or one repetition chosen with ``repetition=``); one
contrast, cardiac phase and set are chosen (0 by default). Readouts that land on the same line
(averages, repeated lines) are averaged. Segments are ignored (they only split k-space in time).

Rejected with :class:`kscan.errors.FileFormatError`: files that are not HDF5 or have no MRD group,
no XML header, no acquisitions or no imaging acquisitions; non-Cartesian encodings (radial, spiral,
EPI, ...) and acquisitions that carry trajectory samples; reversed (EPI-style) readouts; a
coil count that changes between readouts; readouts that fall outside the encoded matrix.

:func:`mrd_to_fastmri` converts a 2D file to fastMRI's layout (:mod:`kscan.pipelines.io.fastmri`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import torch
from ismrmrd.file import Container
from xsdata.exceptions import ParserError
from xsdata.formats.dataclass.parsers import XmlParser
from xsdata.formats.dataclass.parsers.config import ParserConfig

from kscan.errors import FileFormatError
from kscan.pipelines.io.fastmri import write_fastmri
from kscan.pipelines.synthetic import rss_target

_SKIP_FLAGS: dict[str, tuple[int, ...]] = {
    "noise": (ismrmrd.ACQ_IS_NOISE_MEASUREMENT,),
    "navigation": (ismrmrd.ACQ_IS_NAVIGATION_DATA,),
    "phase correction": (ismrmrd.ACQ_IS_PHASECORR_DATA,),
    "feedback": (ismrmrd.ACQ_IS_HPFEEDBACK_DATA, ismrmrd.ACQ_IS_RTFEEDBACK_DATA),
    "dummy scan": (ismrmrd.ACQ_IS_DUMMYSCAN_DATA,),
    "surface coil correction": (ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA,),
    "phase stabilization": (
        ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE,
        ismrmrd.ACQ_IS_PHASE_STABILIZATION,
    ),
}
"""Acquisitions with any of these flags are not imaging data; the key names the reason."""


def _bits(flags: Sequence[int]) -> int:
    """The bit mask of ISMRMRD flags (flag ``f`` is bit ``f - 1``)."""
    return sum(1 << (f - 1) for f in flags)


@dataclass(frozen=True)
class MrdMetadata:
    """What the header and the acquisitions say about the data.

    Attributes:
        encoding_size: ``encodedSpace.matrixSize`` ``(x, y, z)``: readout (with oversampling),
            phase encode, partitions.
        recon_size: ``reconSpace.matrixSize`` ``(x, y, z)``.
        num_coils: receiver channels.
        slices: the ``idx.slice`` of each output slice.
        repetitions: the ``idx.repetition`` of each output repetition (one value when chosen).
        contrasts, phases, sets: the ``idx.contrast`` / ``idx.phase`` / ``idx.set`` values present
            among the imaging readouts (one of each was read).
        skipped: number of acquisitions left out, by reason (``"noise"``, ``"calibration"``, ...).
    """

    encoding_size: tuple[int, int, int]
    recon_size: tuple[int, int, int]
    num_coils: int
    slices: tuple[int, ...]
    repetitions: tuple[int, ...]
    contrasts: tuple[int, ...]
    phases: tuple[int, ...]
    sets: tuple[int, ...]
    skipped: dict[str, int]


@dataclass(frozen=True, eq=False)
class MrdData:
    """Cartesian k-space read from an MRD file.

    Attributes:
        kspace: complex64, centered (k = 0 at ``n // 2``), shaped
            ``(slices, [repetitions,] [partitions,] coils, H, W)``: the repetition axis is there
            unless one repetition was chosen, the partition axis (``kz``, still in k-space) only for
            3D encodings. Lines that were not acquired are zero.
        mask: bool ``(slices, [repetitions,] [partitions,] W)``, True where a line was acquired;
            ``mask[..., None, None, :]`` broadcasts it over ``kspace``.
        header: the parsed ISMRMRD XML header (:class:`ismrmrd.xsd.ismrmrdHeader`).
        metadata: sizes, counts and skipped acquisitions.
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    header: xsd.ismrmrdHeader
    metadata: MrdMetadata


@dataclass(frozen=True)
class _Grid:
    """Where readouts go: sizes ``(H, W, Z)`` and the phase / partition index offsets."""

    size: tuple[int, int, int]
    offset_1: int
    offset_2: int


def read_mrd(
    path: str | os.PathLike[str],
    *,
    repetition: int | None = None,
    contrast: int = 0,
    phase: int = 0,
    set_index: int = 0,
    encoding: int = 0,
    group: str = "dataset",
) -> MrdData:
    """Read the Cartesian k-space of one MRD file (see the module docstring for the placement).

    Args:
        path: an ISMRMRD HDF5 file.
        repetition: ``idx.repetition`` to read; ``None`` reads every repetition into an axis.
        contrast, phase, set_index: the ``idx.contrast``, ``idx.phase`` and ``idx.set`` to read.
        encoding: index of the header's ``<encoding>`` (readouts of other encoding spaces are skipped).
        group: the HDF5 group of the dataset (``ismrmrd.Dataset``'s default is ``"dataset"``).
    """
    path = Path(path)
    header, acquisitions = _read_file(path, group)
    enc = _cartesian_encoding(path, header, encoding)
    imaging, skipped = _imaging_acquisitions(path, acquisitions, enc, encoding)
    chosen = {"contrast": contrast, "phase": phase, "set": set_index}
    if repetition is not None:
        chosen["repetition"] = repetition
    available = {name: sorted({getattr(a.idx, name) for a in imaging}) for name in chosen}
    imaging = _select(path, imaging, chosen, available)
    repetitions = sorted({a.idx.repetition for a in imaging})
    num_coils = _num_coils(path, imaging)
    grid = _grid(enc, imaging)
    slices = sorted({a.idx.slice for a in imaging})
    kspace, counts = _fill(path, imaging, grid, slices, repetitions, num_coils)
    kspace, mask = _finish(kspace, counts, squeeze_repetition=repetition is not None)
    metadata = MrdMetadata(
        encoding_size=_xyz(enc.encodedSpace.matrixSize),
        recon_size=_xyz(enc.reconSpace.matrixSize),
        num_coils=num_coils,
        slices=tuple(slices),
        repetitions=tuple(repetitions),
        contrasts=tuple(available["contrast"]),
        phases=tuple(available["phase"]),
        sets=tuple(available["set"]),
        skipped=skipped,
    )
    return MrdData(kspace=kspace, mask=mask, header=header, metadata=metadata)


def mrd_to_fastmri(
    path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    repetition: int = 0,
    contrast: int = 0,
    phase: int = 0,
    set_index: int = 0,
    encoding: int = 0,
    group: str = "dataset",
    acquisition: str | None = None,
) -> Path:
    """Write one repetition (contrast, phase, set) of a 2D Cartesian MRD file as a fastMRI file.

    - ``kspace`` ``(slices, coils, H, W)`` exactly as :func:`read_mrd` places it (centered, readout
      oversampling kept, unacquired lines zero);
    - every line of ``[padding_left, padding_right)`` acquired in every slice: the target
      ``reconstruction_rss`` = RSS of ``ifft2c(kspace)`` cropped to the header's ``reconSpace``
      ``(x, y)`` (at most ``(H, W)``); otherwise a test-style file with ``mask`` ``(W,)`` and no
      target (the slices must then share one sampling pattern);
    - ``ismrmrd_header``: the MRD header with only the chosen encoding (step-1 limits filled in when
      missing) and without ``subjectInformation`` and ``studyInformation``, which hold patient and
      study identifiers; ``patient_id`` is :func:`write_fastmri`'s pseudonym.

    The file is written atomically. Returns ``out_path``.
    """
    path = Path(path)
    data = read_mrd(
        path,
        repetition=repetition,
        contrast=contrast,
        phase=phase,
        set_index=set_index,
        encoding=encoding,
        group=group,
    )
    if data.kspace.ndim != 4:
        raise FileFormatError(
            f"{path}: 3D encoding (matrix z {data.metadata.encoding_size[2]}); "
            "the fastMRI layout holds 2D slices"
        )
    height, width = data.kspace.shape[-2:]
    header = _fastmri_header(data.header.encoding[encoding], data.header, width)
    limits = header.encoding[0].encodingLimits.kspace_encoding_step_1
    left = width // 2 - limits.center
    mask, kspace = data.mask.numpy(), data.kspace.numpy()
    xml = xsd.ToXML(header).encode("ascii")
    if mask[:, max(left, 0) : left + limits.maximum + 1].all():
        recon_x, recon_y = data.metadata.recon_size[:2]
        target = rss_target(kspace, (min(recon_x, height), min(recon_y, width)))
        return write_fastmri(out_path, kspace, target, header=xml, acquisition=acquisition)
    if not (mask == mask[0]).all():
        raise FileFormatError(
            f"{path}: the slices were sampled on different lines; a fastMRI file holds one mask (W,)"
        )
    return write_fastmri(out_path, kspace, header=xml, mask=mask[0], acquisition=acquisition)


def _fastmri_header(
    enc: xsd.encodingType, header: xsd.ismrmrdHeader, width: int
) -> xsd.ismrmrdHeader:
    """``header`` with ``enc`` as its only encoding, step-1 limits present, no subject or study."""
    limits = enc.encodingLimits
    if limits.kspace_encoding_step_1 is None:  # read_mrd placed line e1 at column e1
        full = xsd.limitType(minimum=0, maximum=width - 1, center=width // 2)
        enc = dataclasses.replace(
            enc, encodingLimits=dataclasses.replace(limits, kspace_encoding_step_1=full)
        )
    return dataclasses.replace(
        header, encoding=[enc], subjectInformation=None, studyInformation=None
    )


def _cartesian_encoding(path: Path, header: xsd.ismrmrdHeader, encoding: int) -> xsd.encodingType:
    """The header's ``encoding``-th ``<encoding>``, which must be Cartesian."""
    if not 0 <= encoding < len(header.encoding):
        raise FileFormatError(
            f"{path}: encoding {encoding} not in the header; it has {len(header.encoding)}"
        )
    enc = header.encoding[encoding]
    if enc.trajectory != xsd.trajectoryType.CARTESIAN:
        raise FileFormatError(
            f"{path}: {enc.trajectory.value} trajectory; only Cartesian acquisitions are supported"
        )
    return enc


def _select(
    path: Path,
    acquisitions: list[ismrmrd.Acquisition],
    chosen: dict[str, int],
    available: dict[str, list[int]],
) -> list[ismrmrd.Acquisition]:
    """The acquisitions whose counters ``idx.<name>`` equal ``chosen[name]``, each value present."""
    for name, value in chosen.items():
        if value not in available[name]:
            raise FileFormatError(
                f"{path}: {name} {value} not in the data; found {available[name]}"
            )
    return [a for a in acquisitions if all(getattr(a.idx, n) == v for n, v in chosen.items())]


def _read_file(path: Path, group: str) -> tuple[xsd.ismrmrdHeader, list[ismrmrd.Acquisition]]:
    """The parsed header and every acquisition of ``group`` in ``path``.

    h5py opens the file (so that its errors can be named) and ismrmrd's ``Container`` decodes the
    acquisitions, all of them in one HDF5 read (``ismrmrd.Dataset.read_acquisition`` reads one at a
    time, about 100x slower).
    """
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            groups = [k for k, v in f.items() if isinstance(v, h5py.Group)]
            if group not in groups:
                raise FileFormatError(f"{path}: no MRD group '{group}'; found groups {groups}")
            container = Container(f[group])
            if not container.has_header():
                raise FileFormatError(f"{path}: group '{group}' has no 'xml' header")
            if not container.has_acquisitions():
                raise FileFormatError(f"{path}: group '{group}' has no acquisitions ('data')")
            xml = f[group]["xml"][0]
            acquisitions = container.acquisitions[:]
    except FileFormatError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise FileFormatError(f"{path}: not a readable HDF5 (MRD) file ({_one_line(err)})") from err
    if not acquisitions:
        raise FileFormatError(f"{path}: group '{group}' has no acquisitions (empty 'data')")
    return _parse_header(path, xml), acquisitions


def _parse_header(path: Path, xml: bytes | str) -> xsd.ismrmrdHeader:
    """Parse the ISMRMRD XML header, ignoring elements that this schema version does not know."""
    config = ParserConfig(fail_on_unknown_properties=False, fail_on_converter_warnings=True)
    parser = XmlParser(config=config)
    try:
        if isinstance(xml, str):
            return parser.from_string(xml, xsd.ismrmrdHeader)
        return parser.from_bytes(xml, xsd.ismrmrdHeader)
    except (ParserError, ValueError, TypeError) as err:
        raise FileFormatError(
            f"{path}: the ISMRMRD XML header does not parse ({_one_line(err)})"
        ) from err


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _imaging_acquisitions(
    path: Path, acquisitions: list[ismrmrd.Acquisition], enc: xsd.encodingType, encoding: int
) -> tuple[list[ismrmrd.Acquisition], dict[str, int]]:
    """The imaging readouts of encoding space ``encoding`` and the count of the others, by reason."""
    skip_bits = {reason: _bits(flags) for reason, flags in _SKIP_FLAGS.items()}
    if not _embedded_calibration(enc):
        skip_bits["calibration"] = _bits((ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,))
    reverse = _bits((ismrmrd.ACQ_IS_REVERSE,))
    skipped: dict[str, int] = {}
    imaging = []
    for acq in acquisitions:
        reason = next((r for r, bits in skip_bits.items() if acq.flags & bits), None)
        if reason is None and acq.encoding_space_ref != encoding:
            reason = "other encoding"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if acq.trajectory_dimensions > 0:
            raise FileFormatError(
                f"{path}: acquisition {acq.scan_counter} carries a {acq.trajectory_dimensions}-D "
                "trajectory; only Cartesian acquisitions are supported"
            )
        if acq.flags & reverse:
            raise FileFormatError(
                f"{path}: acquisition {acq.scan_counter} is a reversed (EPI-style) readout; "
                "only Cartesian acquisitions are supported"
            )
        imaging.append(acq)
    if not imaging:
        raise FileFormatError(
            f"{path}: no imaging acquisitions in encoding {encoding}; skipped {skipped}"
        )
    return imaging, skipped


def _embedded_calibration(enc: xsd.encodingType) -> bool:
    """Whether calibration-only lines were acquired on the imaging grid (``calibrationMode`` embedded)."""
    parallel = enc.parallelImaging
    return parallel is not None and parallel.calibrationMode == xsd.calibrationModeType.EMBEDDED


def _num_coils(path: Path, acquisitions: list[ismrmrd.Acquisition]) -> int:
    """The one coil count shared by every readout."""
    counts = sorted({a.active_channels for a in acquisitions})
    if len(counts) != 1:
        raise FileFormatError(f"{path}: the number of coils changes between readouts: {counts}")
    return counts[0]


def _grid(enc: xsd.encodingType, acquisitions: list[ismrmrd.Acquisition]) -> _Grid:
    """The k-space grid of the encoding: sizes from ``encodedSpace``, offsets from ``encodingLimits``."""
    matrix = enc.encodedSpace.matrixSize
    h = max(matrix.x, max(a.number_of_samples for a in acquisitions))
    w, z = matrix.y, matrix.z
    limits = enc.encodingLimits
    step_1, step_2 = limits.kspace_encoding_step_1, limits.kspace_encoding_step_2
    offset_1 = w // 2 - step_1.center if step_1 is not None else 0
    offset_2 = z // 2 - step_2.center if step_2 is not None and z > 1 else 0
    return _Grid(size=(h, w, z), offset_1=offset_1, offset_2=offset_2)


def _fill(
    path: Path,
    acquisitions: list[ismrmrd.Acquisition],
    grid: _Grid,
    slices: list[int],
    repetitions: list[int],
    num_coils: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum every readout into its place; return the sums and the number of readouts per line.

    Shapes: sums ``(slices, repetitions, Z, coils, H, W)``, counts ``(slices, repetitions, Z, W)``.
    """
    h, w, z = grid.size
    kspace = np.zeros((len(slices), len(repetitions), z, num_coils, h, w), dtype=np.complex64)
    counts = np.zeros((len(slices), len(repetitions), z, w), dtype=np.int64)
    slice_at = {s: i for i, s in enumerate(slices)}
    repetition_at = {r: i for i, r in enumerate(repetitions)}
    for acq in acquisitions:
        line = acq.idx.kspace_encode_step_1 + grid.offset_1
        partition = acq.idx.kspace_encode_step_2 + grid.offset_2
        first, stop = acq.discard_pre, acq.number_of_samples - acq.discard_post
        start = first - acq.center_sample + h // 2
        end = start + stop - first
        if not (0 <= line < w and 0 <= partition < z and 0 <= start and end <= h):
            raise FileFormatError(
                f"{path}: acquisition {acq.scan_counter} (step 1 {acq.idx.kspace_encode_step_1}, "
                f"step 2 {acq.idx.kspace_encode_step_2}, samples {first}..{stop - 1}, centre "
                f"{acq.center_sample}) falls outside the encoded matrix {h}x{w}x{z}"
            )
        s, r = slice_at[acq.idx.slice], repetition_at[acq.idx.repetition]
        kspace[s, r, partition, :, start:end, line] += acq.data[:, first:stop]
        counts[s, r, partition, line] += 1
    return kspace, counts


def _finish(
    kspace: np.ndarray, counts: np.ndarray, squeeze_repetition: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average repeated lines; drop the partition axis of 2D data and a chosen repetition's axis."""
    kspace /= np.maximum(counts, 1)[:, :, :, None, None, :]
    mask = counts > 0
    if kspace.shape[2] == 1:
        kspace, mask = kspace[:, :, 0], mask[:, :, 0]
    if squeeze_repetition:
        kspace, mask = kspace[:, 0], mask[:, 0]
    return torch.from_numpy(np.ascontiguousarray(kspace)), torch.from_numpy(
        np.ascontiguousarray(mask)
    )


def _xyz(size: xsd.matrixSizeType) -> tuple[int, int, int]:
    return int(size.x), int(size.y), int(size.z)
