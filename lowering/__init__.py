"""Quantized ops and their kernels (torch.library custom ops, Triton, CPU path)."""
