"""Datasets: the native JSON format, splits, slices, and importers of the field's raw formats."""
