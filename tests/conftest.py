import os

os.environ.setdefault("MPLBACKEND", "Agg")

# Fixtures live beside the code they serve; each area owns its own plugin module.
pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_redis",
]
