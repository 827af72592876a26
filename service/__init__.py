"""The serving half of gansentry. Nothing under this package may import torch."""
