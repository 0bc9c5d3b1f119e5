"""Thin recipes (one per task) and their command-line registrations."""
