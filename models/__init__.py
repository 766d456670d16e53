"""Model adapters: everything that turns a model into a `solvers.Denoiser`.

Depends on the solver contract only (`solvers.contract`), never on the service or the benchmarks.
"""
