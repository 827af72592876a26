"""Model-repository fixtures for the tests (owned by the service tests)."""
