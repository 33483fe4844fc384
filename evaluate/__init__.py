"""Auditing trained models: key replay, metrics, reports and plots (keyshard.evaluate)."""
