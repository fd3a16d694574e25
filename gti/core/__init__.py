"""Foundations every layer uses: typed configs, user-facing errors, atomic writes, run folders, offline assets, CLI plumbing."""
