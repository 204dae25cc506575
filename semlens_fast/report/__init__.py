"""Self-contained HTML reports: one folder with ``index.html`` and ``img/*.png``, no external resources.

>>> from semlens_fast.report import ReportData, write_report
>>> write_report("out/report", data)  # doctest: +SKIP
"""
from __future__ import annotations

from .data import ComponentCard, LayerSection, ReportData, SearchSection, pca_2d
from .html import write_report

__all__ = ["ComponentCard", "LayerSection", "ReportData", "SearchSection", "pca_2d", "write_report"]
