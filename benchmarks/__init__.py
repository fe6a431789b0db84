"""Benchmarks of histoseg (accuracy, throughput, scaling, precision, runtimes, adaptation); see the README.

A package so that tests and tools import ``benchmarks.classical`` and friends from the repository root; each
module also runs as a script (``python benchmarks/throughput.py``) or as ``python -m benchmarks.throughput``.
Not installed with histoseg.
"""
