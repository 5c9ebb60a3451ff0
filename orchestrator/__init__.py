"""The training program: entry points, config schema and validation, the loop."""
