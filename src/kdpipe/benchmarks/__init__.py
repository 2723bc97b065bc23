"""Benchmarks run by ``kdpipe-bench`` (and ``make bench``)."""
