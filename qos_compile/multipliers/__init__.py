"""Approximate 8x8 multiplier circuits: tables, metrics, importers and the bundled EvoApprox library."""
from .library import Library, bundled, get
from .multiplier import Multiplier, code_offset, code_range, exact_table, table_sha256, validate_table

__all__ = ["Library", "Multiplier", "bundled", "get", "code_offset", "code_range", "exact_table",
           "table_sha256", "validate_table"]
