"""Experiment tracking shared by the entry points: the logger config group and its W&B (or null) logger."""
