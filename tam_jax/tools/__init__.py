"""Command-line tools: `python -m tam_jax.tools.<name> --help`."""
