"""A real Redis server for the tests (owned by the Redis tests)."""
