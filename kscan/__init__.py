"""kscan: MRI pipelines from raw k-space or DICOM/NIfTI images to reconstructions and segmentations.

The subpackages are ``kscan.physics`` (MRI physics), ``kscan.kernels`` (the selective scan),
``kscan.models`` (networks) and ``kscan.pipelines`` (files, metrics, benchmarks, the CLI).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kscan")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
