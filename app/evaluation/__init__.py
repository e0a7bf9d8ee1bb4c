"""Layer 6: scoring generated triplets / labels (P/R/F1) and evaluating a model on a dev file,
also as the F1 callback training uses."""
