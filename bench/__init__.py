"""Jobcast's benchmarks: each ``bench/<name>.py`` with a ``main`` runs by itself (see BENCHMARKS.md)."""
