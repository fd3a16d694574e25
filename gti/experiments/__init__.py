"""Experiments: the benchmark matrix of initialisations and the published-protocol presets."""
