"""The offline half of gansentry: data, models, training, evaluation and ONNX export.
Modules here may import torch; the service never imports this package."""
