"""`serve`: the trained adapters over an OpenAI-compatible HTTP API, many LoRA adapters on one base.

Layers, imports pointing down: server (the command) -> api (HTTP) -> requests (bodies) and engine
(batched generation in one worker thread) -> models (the base and its adapters) -> adapters (which
dirs, path guard)."""
