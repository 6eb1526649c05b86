"""Checkpoints of the widely used PyTorch reference implementation of DeepLabv3+ (e.g.
`best_deeplabv3plus_resnet101_voc_os16.pth`) turned into ours.

The reference saves `{"model_state": state_dict, "optimizer_state", "scheduler_state",
"cur_itrs", "best_score"}`, keys possibly prefixed `module.` (DataParallel). Our module names
follow the reference's, so the mapping is exact: strip `module.`, and separable convolutions
(`...body.0`, `...body.1` in the reference) become our `...0`, `...1`. Every tensor must be used
and every shape must match; anything else is an error that names the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from deeplab_sweep.datasets.catalog import dataset_for_classes, get_dataset
from deeplab_sweep.trainable.checkpoint import CheckpointError, save_checkpoint
from deeplab_sweep.trainable.models import build_model
from deeplab_sweep.trainable.run_config import DataConfig, ModelConfig, RunConfig

_CLASSIFIER = "classifier.classifier.3.weight"


def _raw_state(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    state = obj.get("model_state", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no model state dict found (expected a `model_state` entry)")
    return state


def reference_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(our state dict, separable head?) from a reference state dict."""
    out, separable = {}, False
    for key, value in state.items():
        key = key.removeprefix("module.")
        if ".body." in key:
            separable = True
            key = key.replace(".body.", ".")
        out[key] = value
    return out, separable


def infer_backbone(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("backbone.low_level_features.") for k in state):
        return "mobilenet_v2_reference"  # padded as the reference pads it: its outputs, not ours
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    depth = {6: "resnet50", 23: "resnet101"}.get(len(blocks))
    if depth is None:
        raise CheckpointError(
            f"cannot tell the backbone: {len(blocks)} layer3 blocks "
            "(resnet50 has 6, resnet101 23; mobilenet_v2 has backbone.low_level_features)"
        )
    return depth


def check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict: every model tensor present with the same shape, nothing left over."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing {key} (model expects shape {tuple(ref.shape)})")
        if state[key].shape != ref.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, the model expects {tuple(ref.shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} tensors the model does not use, e.g. {extra[:3]}")


def output_stride_from_name(path: Path) -> int | None:
    m = re.search(r"_os(8|16)\b", path.stem)
    return int(m.group(1)) if m else None


def import_reference(
    path: str | Path, out: str | Path, output_stride: int | None = None, dataset: str | None = None, data_root: str = ""
) -> Path:
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not loadable as plain tensors ({str(e).splitlines()[0][:200]})") from None
    state, separable = reference_to_ours(_raw_state(obj, path))
    if _CLASSIFIER not in state:
        raise CheckpointError(f"{path}: no {_CLASSIFIER}: not a DeepLabv3+ checkpoint")
    backbone = infer_backbone(state)
    num_classes = state[_CLASSIFIER].shape[0]
    if dataset is None:
        dataset = dataset_for_classes(num_classes)
        if dataset is None:
            raise CheckpointError(f"{path}: {num_classes} classes matches no known dataset; pass --dataset")
    if get_dataset(dataset).num_classes != num_classes:
        raise CheckpointError(
            f"{path}: has {num_classes} classes, dataset {dataset!r} has {get_dataset(dataset).num_classes}"
        )
    # Dilation is not a weight: the output stride comes from the caller or the file's name.
    os_ = output_stride or output_stride_from_name(path) or 16
    model = build_model(backbone, num_classes, os_, separable=separable)
    check_shapes(model, state, str(path))
    model.load_state_dict(state, strict=True)
    cfg = RunConfig(
        data=DataConfig(name=dataset, root=data_root),
        model=ModelConfig(backbone=backbone, output_stride=os_, separable=separable),
    )
    meta = {
        "imported_from": str(path),
        "reference_iterations": obj.get("cur_itrs"),
        "reference_best_score": obj.get("best_score"),
    }
    return save_checkpoint(
        out,
        model_state=model.state_dict(),
        config=cfg.to_dict(),
        epoch=0,
        metrics={k: v for k, v in meta.items() if isinstance(v, (int, float, str))},
    )
