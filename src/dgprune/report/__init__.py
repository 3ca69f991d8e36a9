"""Tables (and later plots) from result records."""

from dgprune.report.table1 import Table, table1

__all__ = ["Table", "table1"]
