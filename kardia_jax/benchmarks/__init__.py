"""Benchmarks that print figures: kardia_jax against a reference run in the same process."""
