"""Compression: rank allocation and one-pass factorization, sequential and low-memory compression, gradient correction."""
