"""Distillation after the search: global knowledge distillation (GKD) and its data."""
