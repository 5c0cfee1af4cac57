"""Approximate 8x8 multiplier circuits: tables, metrics, importers and the bundled EvoApprox library."""
from ..numerics import code_offset, code_range
from .families import family
from .importers import import_multiplier
from .library import Library, bundled, get
from .metrics import Metrics, compute_metrics
from .multiplier import Multiplier
from .table import exact_table, table_sha256, validate_table
from .user_library import load_library

__all__ = ["Library", "Metrics", "Multiplier", "bundled", "code_offset", "code_range", "compute_metrics",
           "exact_table", "family", "get", "import_multiplier", "load_library", "table_sha256", "validate_table"]
