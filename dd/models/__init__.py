"""Network architectures, shared by the engines and the training scripts (no serving code here)."""
