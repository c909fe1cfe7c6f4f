"""Foundations every layer may use: errors, atomic file writes, optional dependencies, the run directory layout."""
