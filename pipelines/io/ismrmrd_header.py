"""The ISMRMRD XML header of fastMRI files: the encoding geometry, written and parsed.

fastMRI stores each volume's ISMRMRD header as XML bytes in the ``ismrmrd_header`` dataset and
derives its per-file metadata from four parts of the first ``encoding`` element:

- ``encoding_size`` = ``encodedSpace/matrixSize`` (x, y, z): the acquired k-space grid;
- ``recon_size``    = ``reconSpace/matrixSize`` (x, y, z): the grid of the target image;
- ``encodingLimits/kspace_encoding_step_1`` (minimum, maximum, center): the phase-encode lines that
  were acquired, from which

      padding_left  = encoding_size[1] // 2 - center
      padding_right = padding_left + maximum + 1

  bound the acquired columns ``[padding_left, padding_right)`` of the stored k-space.

Headers are written with the ``ismrmrd`` package's schema classes (:mod:`ismrmrd.xsd`), so they are
valid ISMRMRD XML, and parsed with :mod:`xml.etree.ElementTree` through the same namespaced
descendant lookups fastMRI uses (``.//ns:encoding//ns:encodedSpace//ns:matrixSize//ns:x``), so
kscan reads exactly the numbers fastMRI reads.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

import ismrmrd.xsd as xsd

from kscan.errors import FileFormatError

NAMESPACE = "http://www.ismrm.org/ISMRMRD"

Triple = tuple[int, int, int]
FloatTriple = tuple[float, float, float]


@dataclass(frozen=True)
class EncodingGeometry:
    """The parts of an ISMRMRD header that fastMRI reads (plus the fields of view, when present).

    ``phase_limits`` is ``encodingLimits/kspace_encoding_step_1`` as (minimum, maximum, center).
    Fields of view are in millimetres, (x, y, z); ``None`` when a parsed header lacks them.
    """

    encoding_size: Triple
    recon_size: Triple
    phase_limits: Triple
    encoding_fov_mm: FloatTriple | None = None
    recon_fov_mm: FloatTriple | None = None

    @property
    def padding_left(self) -> int:
        """First acquired phase-encode column: ``encoding_size[1] // 2 - center``."""
        return self.encoding_size[1] // 2 - self.phase_limits[2]

    @property
    def padding_right(self) -> int:
        """One past the last acquired column: ``padding_left + maximum + 1``."""
        return self.padding_left + self.phase_limits[1] + 1


def geometry_for_shape(
    kspace_hw: tuple[int, int],
    recon_hw: tuple[int, int],
    voxel_size_mm: FloatTriple = (1.0, 1.0, 1.0),
) -> EncodingGeometry:
    """The geometry of fully acquired k-space ``(H, W)`` reconstructed on a ``recon_hw`` grid.

    Every phase-encode column is acquired: limits (0, W - 1, W // 2), so ``padding_left = 0`` and
    ``padding_right = W``. The image from the inverse FFT of ``(H, W)`` k-space has the pixel size
    ``voxel_size_mm[:2]``, hence fields of view ``(H dx, W dy, dz)`` encoded and ``(rH dx, rW dy, dz)``
    reconstructed (the target is a centre crop of that image).
    """
    (height, width), (r_height, r_width) = kspace_hw, recon_hw
    dx, dy, dz = (float(v) for v in voxel_size_mm)
    return EncodingGeometry(
        encoding_size=(int(height), int(width), 1),
        recon_size=(int(r_height), int(r_width), 1),
        phase_limits=(0, int(width) - 1, int(width) // 2),
        encoding_fov_mm=(height * dx, width * dy, dz),
        recon_fov_mm=(r_height * dx, r_width * dy, dz),
    )


def _space(size: Triple, fov: FloatTriple | None) -> xsd.encodingSpaceType:
    fov = fov if fov is not None else (float(size[0]), float(size[1]), float(size[2]))
    return xsd.encodingSpaceType(
        matrixSize=xsd.matrixSizeType(x=size[0], y=size[1], z=size[2]),
        fieldOfView_mm=xsd.fieldOfViewMm(x=fov[0], y=fov[1], z=fov[2]),
    )


def header_xml(
    geometry: EncodingGeometry,
    num_coils: int | None = None,
    larmor_frequency_hz: int = 127_740_000,
) -> bytes:
    """Valid ISMRMRD XML (bytes) for ``geometry``: one Cartesian encoding.

    The schema requires ``experimentalConditions/H1resonanceFrequency_Hz`` (default: 3 T proton)
    and a field of view; a geometry without one gets 1 mm voxels. ``num_coils`` fills
    ``acquisitionSystemInformation/receiverChannels``.
    """
    minimum, maximum, center = geometry.phase_limits
    encoding = xsd.encodingType(
        encodedSpace=_space(geometry.encoding_size, geometry.encoding_fov_mm),
        reconSpace=_space(geometry.recon_size, geometry.recon_fov_mm),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=xsd.limitType(minimum=minimum, maximum=maximum, center=center)
        ),
        trajectory=xsd.trajectoryType.CARTESIAN,
    )
    header = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(
            H1resonanceFrequency_Hz=larmor_frequency_hz
        ),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            receiverChannels=num_coils
        ),
    )
    header.encoding.append(encoding)
    return xsd.ToXML(header).encode("ascii")


def _query(root: ElementTree.Element, path: tuple[str, ...]) -> str | None:
    """Text of the first element matching fastMRI's lookup ``.//ns:a//ns:b...``, or None."""
    expr = "." + "".join(f"//ismrmrd:{part}" for part in path)
    element = root.find(expr, {"ismrmrd": NAMESPACE})
    return None if element is None else element.text


def _numbers(
    root: ElementTree.Element, path: tuple[str, ...], keys: tuple[str, ...], kind: type, source: str
) -> tuple:
    values = []
    for key in keys:
        text = _query(root, (*path, key))
        if text is None:
            raise FileFormatError(f"{source}: ismrmrd_header has no {'/'.join((*path, key))}")
        try:
            values.append(kind(text.strip()))
        except ValueError as err:
            raise FileFormatError(
                f"{source}: ismrmrd_header {'/'.join((*path, key))} is {text!r}; expected {kind.__name__}"
            ) from err
    return tuple(values)


def _optional_fov(root: ElementTree.Element, space: str, source: str) -> FloatTriple | None:
    path = ("encoding", space, "fieldOfView_mm")
    if _query(root, (*path, "x")) is None:
        return None
    return _numbers(root, path, ("x", "y", "z"), float, source)


def parse_header(xml: bytes | str, source: str) -> EncodingGeometry:
    """The :class:`EncodingGeometry` of ISMRMRD XML, read as fastMRI reads it.

    ``source`` names the file in error messages. Raises :class:`FileFormatError` when the XML does
    not parse or lacks a matrix size or the phase-encode limits.
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise FileFormatError(f"{source}: ismrmrd_header is not valid XML ({err})") from err
    xyz = ("x", "y", "z")
    return EncodingGeometry(
        encoding_size=_numbers(root, ("encoding", "encodedSpace", "matrixSize"), xyz, int, source),
        recon_size=_numbers(root, ("encoding", "reconSpace", "matrixSize"), xyz, int, source),
        phase_limits=_numbers(
            root,
            ("encoding", "encodingLimits", "kspace_encoding_step_1"),
            ("minimum", "maximum", "center"),
            int,
            source,
        ),
        encoding_fov_mm=_optional_fov(root, "encodedSpace", source),
        recon_fov_mm=_optional_fov(root, "reconSpace", source),
    )
