"""The commands of the `lineside` CLI, one module per command or group (see lineside/cli.py)."""
