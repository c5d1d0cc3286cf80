"""Drift reports: the system against what the planners would leave."""
