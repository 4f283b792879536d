"""The embedding network as ONNX, for identification where torch is not installed (onnxruntime): the network with
flip TTA and L2 normalisation inside, its input size, mean and std and embedding size in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from .inference import embed_batch
from .model import input_stats
from .run import RunError, load_run


class Embedder(torch.nn.Module):
    """What `inference.embed_batch` computes at one size: the normalised mean of the normalised embeddings of the
    photo, of its crops with five-crop TTA and of the mirrors with flip TTA."""

    def __init__(self, model: torch.nn.Module, flip: bool = True, five_crop: bool = False):
        super().__init__()
        self.model, self.flip, self.five_crop = model, flip, five_crop
        self.eval()  # the mode torch.onnx.export restores afterwards, to the network too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embed_batch(self.model, x, self.flip, five_crop=self.five_crop)


def export(run: Path, out: Path) -> Path:
    """Write RUN's best weights as ONNX to `out` (batch size free, the run's image size)."""
    import onnx

    from .catalogue import fingerprint

    cfg, model, _ = load_run(run)
    size = cfg.data.image_size
    embedder = Embedder(model, cfg.predict.flip_tta, cfg.predict.five_crop)
    mean, std = input_stats(cfg)
    meta = {"input_size": json.dumps([3, size, size]), "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
            "embedding_dim": str(cfg.model.embedding_dim), "flip_tta": str(cfg.predict.flip_tta).lower(),
            "five_crop": str(cfg.predict.five_crop).lower(),
            "backbone": cfg.model.backbone, "fingerprint": fingerprint(run), "pixels": "RGB, 0-1, then (x-mean)/std"}

    def write(tmp: Path) -> None:
        torch.onnx.export(embedder, (torch.rand(2, 3, size, size),), str(tmp), input_names=["images"],
                          output_names=["embeddings"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
        proto = onnx.load(str(tmp))
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))

    return atomic_write(out, write)


class OnnxEmbedder:
    """Embeddings of normalised photo batches with onnxruntime, from a file `export` wrote."""

    def __init__(self, path: Path):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise RunError("--onnx needs onnxruntime: pip install onnxruntime") from err
        if not path.is_file():
            raise RunError(f"--onnx {path} does not exist; write it with reid export --run RUN --out {path}")
        self.runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.meta = dict(self.runtime.get_modelmeta().custom_metadata_map)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.runtime.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})[0]
