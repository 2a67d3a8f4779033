from kscan.kernels.routes import (
    MHSVM_HEAD_ROUTES,
    ROUTES,
    VMAMBA_ROUTES,
    cross_merge,
    cross_scan,
    inverse,
    route,
)
from kscan.kernels.scan import selective_scan

__all__ = [
    "MHSVM_HEAD_ROUTES",
    "ROUTES",
    "VMAMBA_ROUTES",
    "cross_merge",
    "cross_scan",
    "inverse",
    "route",
    "selective_scan",
]
