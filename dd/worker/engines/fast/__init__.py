"""The fast engine (FastMaskRCNN) and its internals: fixed shapes, fused blocks, graph captures."""
