"""Mining on Manifolds: the library (algorithms, models, metrics).

Arrays, sparse matrices and tensors in and out. Nothing here reads params.yaml,
parses a command line or decides a file path.
"""
