"""How much batch the run can use: the gradient noise scale, from a batch cut in parts, the ranks' or the micro-batches' gradients, and its running mean over a run."""
