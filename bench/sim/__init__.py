"""The routing simulator used by `python -m bench.eval`."""
