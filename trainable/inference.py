"""Using a checkpoint: rebuild its model from the config it stores, evaluate it exactly as the
training loop did, and predict colour masks + overlays for image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deeplab_sweep.datasets.base import read_image
from deeplab_sweep.datasets.transforms import val_transform
from deeplab_sweep.trainable.checkpoint import CheckpointError, load_checkpoint
from deeplab_sweep.trainable.engine import evaluate, val_loader, val_metrics
from deeplab_sweep.trainable.models import build_from_config, registered_models
from deeplab_sweep.trainable.run_config import RunConfig
from deeplab_sweep.trainable.visuals import colorize


def load_model(
    path: str | Path, device: torch.device | str = "cpu", model_factory: str | None = None
) -> tuple[torch.nn.Module, RunConfig, dict]:
    """The checkpoint's model, config and contents. A checkpoint is untrusted input (one from a
    shared MLflow server is anyone's): its model is built only from the registered models,
    unless `model_factory` names the `pkg.module:callable` it stores (the user's opt-in)."""
    ckpt = load_checkpoint(path, map_location=device)
    try:
        cfg = RunConfig.model_validate(ckpt["config"])
    except Exception as e:
        raise CheckpointError(f"{path}: its stored config does not validate ({e})") from None
    factory = cfg.model.factory
    if factory not in registered_models() and factory != model_factory:
        raise CheckpointError(
            f"{path}: its config names model.factory = {factory!r}, not a registered model "
            f"({', '.join(registered_models())}); a checkpoint's own code is imported only when you name it: "
            f"--model-factory {factory}"
        )
    # Weights are in the checkpoint: never fetch pretrained backbone weights to build the shell.
    model = build_from_config(cfg.model.model_copy(update={"pretrained_backbone": False}), cfg.data.num_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400]
        raise CheckpointError(
            f"{path}: weights do not fit its config ({cfg.model.backbone}, {cfg.data.num_classes} classes): {detail}"
        ) from None
    return model.to(device).eval(), cfg, ckpt


def evaluate_checkpoint(
    path: str | Path, data_root: str | None = None, device: str = "cpu", model_factory: str | None = None
) -> dict:
    """The validation metrics of a checkpoint, computed as in training (same transform, same
    whole-image or centre-crop setting, same images)."""
    model, cfg, ckpt = load_model(path, device, model_factory)
    loader = val_loader(cfg, data_root=data_root)
    cm = evaluate(model, loader, cfg.data.num_classes, torch.device(device), cfg)
    metrics = val_metrics(cm, cfg.data.spec.class_names)
    return {"epoch": ckpt["epoch"], "images": len(loader.dataset), **metrics}


@torch.no_grad()
def predict_images(
    model: torch.nn.Module, images: list[torch.Tensor], device: str | torch.device = "cpu", probabilities: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per uint8 [3, H, W] RGB image: its class-id mask [H, W] (uint8), and with
    `probabilities` its softmax [classes, H, W]. Whole images, one at a time, through the
    validation transform: what evaluation scores (padding a batch would change the predictions)."""
    transform = val_transform(None)
    out = []
    for image in images:
        x, _ = transform(image, torch.zeros(image.shape[-2:], dtype=torch.long))
        logits = model(x.unsqueeze(0).to(device))[0]
        mask = logits.argmax(0).to(torch.uint8 if logits.shape[0] <= 256 else torch.int32).cpu()
        out.append((mask, logits.softmax(0).cpu() if probabilities else None))
    return out


@torch.no_grad()
def predict_files(
    path: str | Path,
    inputs: list[Path],
    out: Path,
    device: str = "cpu",
    alpha: float = 0.5,
    model_factory: str | None = None,
) -> list[Path]:
    model, cfg, _ = load_model(path, device, model_factory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p in inputs:
        image = read_image(p)
        ((pred, _),) = predict_images(model, [image], device)
        colour = Image.fromarray(colorize(pred, cfg.data.spec.palette).permute(1, 2, 0).numpy())
        overlay = Image.blend(Image.fromarray(image.permute(1, 2, 0).numpy()), colour, alpha)
        for suffix, im in (("mask", colour), ("overlay", overlay)):
            dest = out / f"{p.stem}_{suffix}.png"
            im.save(dest)
            written.append(dest)
        Image.fromarray(pred.numpy().astype(np.uint8)).save(out / f"{p.stem}_ids.png")
        written.append(out / f"{p.stem}_ids.png")
    return written
