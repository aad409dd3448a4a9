"""Evaluation of trained models: metrics (plots, Grad-CAM, reports and comparison build on them)."""
