"""Mamba-1's selective scan with initial states and packed-document support.

The public op is `selective_scan_fn`; its specification is `reference.selective_scan_ref`.
"""
from .interface import selective_scan_fn

__all__ = ["selective_scan_fn"]
