"""The Typer command-line interface (thin: parse, build config, call the public API)."""
