"""dense-ops benchmarks: `python -m benchmarks --help`."""
