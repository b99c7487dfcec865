"""Experiment grids: a YAML spec of cells (spec.py) and the table and figure of their results (report.py)."""
