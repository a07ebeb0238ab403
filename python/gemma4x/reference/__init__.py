"""Pure-PyTorch twins of every gemma4x op: fp32 math, same signatures, any device."""
