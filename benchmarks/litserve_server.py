"""The comparison server for `serve_benchmark.py`: LitServe's own batching around the same
ONNX Runtime session and preprocessing as gansentry, LitServe's defaults otherwise (one
API server, one inference worker). Its own module because LitServe pickles the API class
into its worker process.

    python benchmarks/litserve_server.py --model-dir models/NAME/VERSION --port 8001"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import litserve as ls
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gansentry.contract import MODEL_FILE  # noqa: E402
from gansentry.manifest import Manifest  # noqa: E402
from gansentry.preprocessing import decode_base64_image  # noqa: E402


class GanAPI(ls.LitAPI):
    def __init__(self, model_dir: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        from service.providers import create_session
        from service.settings import Settings

        manifest = Manifest.load(Path(self.model_dir))
        self.spec = manifest.input
        self.threshold = manifest.threshold.value
        self.session, _ = create_session(
            Path(self.model_dir) / MODEL_FILE, Settings(providers="cpu"), self.spec.shape
        )

    def decode_request(self, request: dict) -> np.ndarray:
        return decode_base64_image(request["inputs"][0]["image"], self.spec)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> list[float]:
        scores, _ = self.session.run(["score", "reconstruction"], {"x": x})
        return scores.reshape(-1).tolist()

    def unbatch(self, output: list[float]) -> list[float]:
        return output

    def encode_response(self, score: float) -> dict:
        return {"results": [{"score": score, "is_anomaly": score > self.threshold}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    args = parser.parse_args()
    api = GanAPI(args.model_dir, args.max_batch_size, args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
