"""Reliability tests (issue 8): faults, outages and concurrency against real local services."""
