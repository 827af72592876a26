"""gansentry: GAN anomaly detectors trained offline and served as ONNX graphs."""

__version__ = "0.1.0"
