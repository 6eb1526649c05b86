"""The MLflow Model's code ("models from code": MLflow runs this file to load the model, so no
pickled Python object is ever loaded). It takes a column `image` of encoded images (PNG, JPEG:
bytes in Python, base64 in a REST request) or uint8 H x W x 3 RGB arrays, and gives a column
`mask` of uint8 H x W class ids, the size of each image, as `deeplab predict` does; with the
parameter `probabilities` also their softmax, classes x H x W. The checkpoint is the model's
artifact, loaded with `weights_only=True`; a user's own `model.factory` is trusted only when
the model's config names it (`deeplab best --model-factory`)."""

from __future__ import annotations

import base64
import binascii

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from deeplab_sweep.datasets.base import decode_image_bytes
from deeplab_sweep.errors import DatasetError
from deeplab_sweep.trainable.inference import load_model, predict_images


class DeepLabV3Plus(PythonModel):
    def load_context(self, context):
        config = context.model_config or {}
        self.device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg, _ = load_model(context.artifacts["checkpoint"], self.device, config.get("model_factory"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "image" not in model_input:
            raise _bad(f"the input has no column 'image' (columns: {', '.join(map(str, model_input.columns))})")
        images = [_image(value, i) for i, value in enumerate(model_input["image"])]
        probabilities = bool((params or {}).get("probabilities", False))
        results = predict_images(self.model, images, self.device, probabilities)
        out = pd.DataFrame({"mask": [mask.numpy() for mask, _ in results]})
        if probabilities:
            out["probabilities"] = [p.numpy() for _, p in results]
        return out


def _image(value, i: int) -> torch.Tensor:
    """uint8 [3, H, W] from encoded bytes, base64 text or an H x W x 3 uint8 array."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise _bad(f"image {i}: text that is not base64 ({e})") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return decode_image_bytes(value, f"image {i}")
        except DatasetError as e:
            raise _bad(str(e)) from None
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise _bad(
            f"image {i}: {array.dtype} array of shape {array.shape}; "
            "give encoded image bytes or a uint8 H x W x 3 RGB array"
        )
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


set_model(DeepLabV3Plus())
