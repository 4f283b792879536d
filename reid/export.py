"""The embedding network as ONNX, for identification where torch is not installed (onnxruntime): the network with
flip TTA and L2 normalisation inside, its input size, mean and std and embedding size in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from .model import input_stats
from .run import RunError, load_run


class Embedder(torch.nn.Module):
    """What `inference.embed_batch` computes at one size: the normalised mean of the photo's and its mirror's
    normalised embeddings."""

    def __init__(self, model: torch.nn.Module, flip: bool = True):
        super().__init__()
        self.model, self.flip = model.eval(), flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(self.model(x), dim=1)
        if self.flip:
            e = e + torch.nn.functional.normalize(self.model(torch.flip(x, dims=[3])), dim=1)
        return torch.nn.functional.normalize(e, dim=1)


def export(run: Path, out: Path) -> Path:
    """Write RUN's best weights as ONNX to `out` (batch size free, the run's image size)."""
    import onnx

    from .catalogue import fingerprint

    cfg, model, _ = load_run(run)
    size = cfg.data.image_size
    embedder = Embedder(model, cfg.predict.flip_tta)
    mean, std = input_stats(cfg)
    meta = {"input_size": json.dumps([3, size, size]), "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
            "embedding_dim": str(cfg.model.embedding_dim), "flip_tta": str(cfg.predict.flip_tta).lower(),
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
