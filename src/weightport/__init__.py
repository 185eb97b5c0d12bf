"""weightport: NumPy arrays into PyTorch modules, checked first, written in place, all or nothing."""
