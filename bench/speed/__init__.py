"""Speed benchmarks (pytest-benchmark), run by `make bench`; not part of the test suite."""
