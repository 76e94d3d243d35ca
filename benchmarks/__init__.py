"""Benchmarks of cumo-moe against its peers: pytest-benchmark suites and the report script."""
