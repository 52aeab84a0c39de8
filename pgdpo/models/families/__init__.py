"""Family adapters, one module each."""
