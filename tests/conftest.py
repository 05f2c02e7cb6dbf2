"""Fixtures shared by several test files: one real SLURM cluster per test session (started on first use)."""

from tests.slurm_cluster import slurm_cluster  # noqa: F401 - a fixture, found by name
