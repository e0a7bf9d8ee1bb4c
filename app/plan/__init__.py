"""Layer 4: what this machine can do and what the run will be: resources (RAM, cgroups, GPUs),
the memory estimator, the tier table and its decisions, precision and packing policy."""
