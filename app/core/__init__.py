"""Layer 0: what every other layer may use: errors, logging/file helpers, plots, the hub check.
Imports nothing from app."""
