"""Compile to a target: candidates with measured sensitivity, one plan, a model built to it."""
