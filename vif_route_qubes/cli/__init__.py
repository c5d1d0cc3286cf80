"""Command lines: click parses them, from the one option table (optspec)."""
