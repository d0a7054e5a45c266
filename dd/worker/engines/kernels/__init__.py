"""Triton kernels, each with its plain-torch fallback behind one switch (switch.py)."""
