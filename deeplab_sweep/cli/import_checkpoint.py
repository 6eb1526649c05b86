"""`deeplab import-checkpoint`: a reference-implementation checkpoint mapped onto our model."""

from __future__ import annotations

from pathlib import Path

from deeplab_sweep.cli.common import command

NAME = "import-checkpoint"


def add(sub) -> None:
    from deeplab_sweep.datasets.catalog import DATASETS

    im = command(
        sub,
        NAME,
        "convert a reference-implementation checkpoint to ours",
        """\
        Read a checkpoint of the widely used PyTorch DeepLabv3+ reference implementation
        ({"model_state": ..., "cur_itrs": ...}, keys possibly prefixed module.), map every tensor
        onto our model (strict: shapes checked, nothing left over), infer backbone, classes and
        separable head from the tensors, and write our checkpoint format.""",
        """
        deeplab import-checkpoint best_deeplabv3plus_resnet101_voc_os16.pth --out imported/r101_voc
        deeplab import-checkpoint model.pth --out imported/m --output-stride 8 --dataset cityscapes
        deeplab eval --checkpoint imported/r101_voc --data-root /data/voc""",
    )
    im.add_argument("path", type=Path)
    im.add_argument("--out", required=True, type=Path, help="folder for checkpoint.pt")
    im.add_argument(
        "--output-stride",
        type=int,
        choices=[8, 16],
        default=None,
        help="not stored in the weights: default from the file name (_os8/_os16), else 16",
    )
    im.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=None,
        help="default: the first dataset with the checkpoint's class count (21: voc, 19: cityscapes)",
    )
    im.add_argument("--data-root", default="", help="dataset root to record in the config")


def run(args) -> int:
    from deeplab_sweep.trainable.import_ref import import_reference

    print(f"wrote {import_reference(args.path, args.out, args.output_stride, args.dataset, args.data_root)}")
    return 0
