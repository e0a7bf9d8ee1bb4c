"""Layer 3: base models and tokenizers (hub name, local dir, tiny), quantization, LoRA and
P-Tuning, and what is on disk (artifacts: adapters, merges, exports; integrity: their files whole)."""
