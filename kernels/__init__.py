"""Fused operations, one folder per op: reference.py (the specification in plain PyTorch), the fast
version, and __init__.py exposing the public op. Knows nothing of nn.Modules.

Backend selection for every op is in kernels/backend.py (environment variable HYBRID_ZOO_KERNELS).
"""
