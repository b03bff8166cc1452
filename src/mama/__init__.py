"""mama."""
