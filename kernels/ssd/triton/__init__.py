"""Triton kernels of the chunked SSD algorithm, one file per stage.

Forward: chunk_cumsum (dt and its in-chunk log-decay prefix) -> chunk_state (each chunk's own
contribution to the state) -> state_passing (states entering every chunk) -> bmm (C B^T within
chunks) -> chunk_scan (the outputs). Backward: chunk_scan_bwd (dC, dx, dB, ddt pieces),
state_passing's reverse recurrence, chunk_cumsum's reverse cumsum and dt chain rule.
kernels/ssd/fused.py composes them; kernels/ssd/reference.py is their specification.
"""
