"""Experiments built on the training pipeline: measured claims with their reports."""
