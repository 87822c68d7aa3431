"""Project checkov checks (loaded with --external-checks-dir)."""
