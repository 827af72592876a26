"""Render README's anomaly-map picture from a real `/score` request: the MNIST test 7
scored by the shipped `mnist-ganomaly` with its reconstruction and anomaly map, shown
side by side (input, reconstruction, map), each enlarged 4x.

    python docs/examples/anomaly_map_figure.py  # writes docs/anomaly-map-7.png"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from gansentry.manifest import Manifest
from gansentry.preprocessing import array_to_png, decode_image
from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCALE, GAP = 4, 8


async def score_seven() -> dict:
    app = create_app(Settings(models_dir=ROOT / "models", providers="cpu"))
    image = base64.b64encode((ROOT / "docs" / "examples" / "mnist-test-7.png").read_bytes())
    body = {
        "model": "mnist-ganomaly",
        "inputs": [{"image": image.decode()}],
        "return_reconstruction": True,
        "return_anomaly_map": True,
    }
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gansentry") as client:
            r = await client.post("/score", json=body)
    r.raise_for_status()
    return r.json()


def main() -> None:
    answer = asyncio.run(score_seven())
    result = answer["results"][0]
    shown = {k: v for k, v in result.items() if k not in ("reconstruction", "anomaly_map")}
    print(json.dumps({"version": answer["version"], **shown}))
    spec = Manifest.load(ROOT / "models" / "mnist-ganomaly" / str(answer["version"])).input
    seven = decode_image((ROOT / "docs" / "examples" / "mnist-test-7.png").read_bytes(), spec)
    panels = [
        Image.open(io.BytesIO(array_to_png(seven))).convert("RGB"),
        Image.open(io.BytesIO(base64.b64decode(result["reconstruction"]))).convert("RGB"),
        Image.open(io.BytesIO(base64.b64decode(result["anomaly_map"]))).convert("RGB"),
    ]
    size = 32 * SCALE
    canvas = Image.new("RGB", (3 * size + 2 * GAP, size), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel.resize((size, size), Image.NEAREST), (i * (size + GAP), 0))
    out = ROOT / "docs" / "anomaly-map-7.png"
    canvas.save(out)
    print(out, np.asarray(canvas).shape)


if __name__ == "__main__":
    main()
