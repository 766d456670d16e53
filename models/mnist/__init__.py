"""The embedded MNIST models: the data reader, the architectures, and the training scripts of the
class-conditional diffusion model (`mnist`) and of the feature classifier the benchmarks use.

The shipped weights live in models/builtin/. Depends on torch, diffusers and the standard library;
never on the service or the benchmarks.
"""
