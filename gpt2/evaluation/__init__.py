"""Evaluations of a trained model: HellaSwag scored by the project, and lm-evaluation-harness."""
