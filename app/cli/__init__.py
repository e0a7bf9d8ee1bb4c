"""Layer 8: `python -m app <command>`: the commands, their pre-flight checks, the
workspace (sample data, clean, remove-run) and the demo recipe. Only the web UI above imports it."""
