"""Benchmarks: how fast the aggregator ingests, against baselines measured in the same run.

``python -m bench`` (``make bench``) starts a real Mosquitto (the deploy profile) and a real
InfluxDB on loopback, runs every case with a fresh database and rewrites ``BENCHMARKS.md``.
Benchmarks never run in the test suite; timing belongs here.
"""
