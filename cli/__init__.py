"""The `epd-serve` command line."""
