"""The benchmark harness: `python -m bench COMMAND` (or `sampler-bench COMMAND`).

One module per command (accuracy.py, solver_overhead.py, ...), each with `add_parser` and `run`;
`__main__.py` only wires them into argparse. Results go to bench/results/ with the provenance of
the run beside them (provenance/). Imports the solver core and the models; serve-load
drives the service as a client (in a subprocess).
"""
