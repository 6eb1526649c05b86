"""CPU latency of one 513 x 513 image through the exported model (`deeplab export`) against the
eager model it came from: eager PyTorch, TorchScript, ONNX Runtime (CPU), for MobileNetV2 and
ResNet-50 (OS 16, random weights: latency does not depend on them), in one run, each the
median of `--repeat` batch-1 forward passes after 3 warm-up passes, the arms interleaved.

    python benchmarks/export_latency.py [--repeat 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.checkpoint import save_checkpoint
from deeplab_sweep.trainable.export import export
from deeplab_sweep.trainable.inference import load_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def arms(backbone: str, folder: Path) -> dict:
    import onnxruntime

    cfg = load_job(
        CONF / "train" / "demo.yaml",
        ["data.root=unused", "model.pretrained_backbone=false", f"model.backbone={backbone}", "model.output_stride=16"],
    ).run
    from deeplab_sweep.trainable.models import build_from_config

    model = build_from_config(cfg.model, cfg.data.num_classes)
    path = save_checkpoint(folder / backbone, model_state=model.state_dict(), config=cfg.to_dict(), epoch=0, metrics={})
    export(path, "onnx", folder / backbone / "onnx")
    export(path, "torchscript", folder / backbone / "ts")
    eager, _, _ = load_model(path)
    script = torch.jit.load(str(folder / backbone / "ts" / "model.pt"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        str(folder / backbone / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    return {
        "eager": lambda x: eager(x),
        "torchscript": lambda x: script(x),
        "onnxruntime": lambda x: session.run(None, {"image": x.numpy()}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, 513, 513)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for backbone in ("mobilenet_v2", "resnet50"):
            run = arms(backbone, Path(tmp))
            times: dict[str, list[float]] = {name: [] for name in run}
            for _ in range(3):
                for fn in run.values():
                    fn(x)
            for _ in range(args.repeat):
                for name, fn in run.items():
                    t = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - t)
            eager = statistics.median(times["eager"])
            print(
                f"{backbone} OS 16, 513 x 513, {args.threads} threads: "
                + ", ".join(
                    f"{name} {statistics.median(v) * 1000:.0f} ms ({statistics.median(v) / eager:.2f}x eager)"
                    for name, v in times.items()
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
