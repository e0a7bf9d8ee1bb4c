"""Layer 2 (above core and config): records read from a file or the hub, their encoding into
token rows, and the synthetic triplet data. No model is loaded here."""
