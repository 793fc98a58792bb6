"""Per-step statistics of training: gradient norms fused on the device, which parameters a backward reached, and the buffer between read-backs."""
