"""Framework-independent parts of the QoS-Nets search (NumPy/scikit-learn on traced arrays).

* :mod:`.error_model`: reference spread, predicted and measured multiplier error per layer (step 4);
* :mod:`.operating_points`: ratio matrix, k-means selection of at most n circuits for all OPs (step 5);
* :mod:`.power`: relative multiplication power per OP and parameter overhead (step 6).
"""
from .error_model import (
    agreement,
    measure_error_std,
    predict_error_std,
    predict_error_std_many,
    reference_spread,
    sample_rows,
)
from .operating_points import (
    DEFAULT_SCALES,
    OperatingPointResult,
    compress_ratios,
    layer_tolerance,
    ratio_matrix,
    select_operating_points,
)
from .power import circuit_powers, op_power_table, param_overhead, relative_power

__all__ = [
    "DEFAULT_SCALES",
    "OperatingPointResult",
    "agreement",
    "circuit_powers",
    "compress_ratios",
    "layer_tolerance",
    "measure_error_std",
    "op_power_table",
    "param_overhead",
    "predict_error_std",
    "predict_error_std_many",
    "ratio_matrix",
    "reference_spread",
    "relative_power",
    "sample_rows",
    "select_operating_points",
]
