"""Planning a run before launching it: per-rank peak memory (parameters, gradients, optimizer
states and activations), step time on a described cluster, and the fastest layout that fits."""
