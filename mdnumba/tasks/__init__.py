"""Generated training tasks."""
