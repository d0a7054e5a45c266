"""Synthetic RGB-D depalletizing data, so training and tests need no real recordings."""
