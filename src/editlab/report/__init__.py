"""Self-contained HTML reports (tables and embedded plots) from a result store."""

from .html import aggregate, write_report

__all__ = ["aggregate", "write_report"]
