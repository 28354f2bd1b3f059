"""Benchmarks for quota-sidecar (issue 5): `python -m bench` (see BENCHMARKS.md).

Starts, on 127.0.0.1 only and bounded in time, a small upstream, a bare aiohttp reverse proxy
(the baseline) and the sidecar on a real redis-server, drives each with the same load, and
reports throughput, latency, Redis commands per request and peak memory.
"""
