"""Layer 8 (top): `python -m app <command>`: the commands, their pre-flight checks, the
workspace (sample data, clean, remove-run) and the demo recipe. Nothing imports this layer."""
