"""Mamba-2's SSD scan (state space duality, Dao & Gu 2024) and its single-token decode step.

The public ops are `mamba_chunk_scan_combined` and `ssd_step`; their specification is
kernels/ssd/reference.py.
"""
from .interface import mamba_chunk_scan_combined, ssd_step

__all__ = ["mamba_chunk_scan_combined", "ssd_step"]
