"""Benchmarks for the payment service: `python -m bench` (see bench/harness.py).

Benchmarks are not tests: they print figures and targets, and never fail on a missed target.
"""
