"""The questions service the CLI and the HTTP API share, its guard and the coverage gaps."""
