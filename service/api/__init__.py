"""HTTP routes: scoring, the model repository, health and metrics."""
