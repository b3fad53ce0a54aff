"""Decoding methods, one per file; see methods/base.py for the interface."""
