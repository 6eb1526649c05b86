"""`deeplab data synth|verify|download`: datasets in their real on-disk layouts."""

from __future__ import annotations

import sys
from pathlib import Path

from deeplab_sweep.cli.common import command

NAME = "data"


def add(sub) -> None:
    from deeplab_sweep.datasets.catalog import DATASETS

    names = list(DATASETS)
    d = command(
        sub,
        NAME,
        "generate, verify or download datasets",
        "Datasets in their real on-disk layouts.",
        """
        deeplab data synth voc --out runs/data/synth_voc
        deeplab data verify voc_aug --root /data/voc
        deeplab data download voc --root /data/voc
        deeplab data download cityscapes --root /data/cityscapes   # after placing the zips""",
    )
    actions = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser("synth", help="write a small generated dataset in the real layout")
    s.add_argument("dataset", choices=names)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--train", type=int, default=None, help="number of train images")
    s.add_argument("--val", type=int, default=None, help="number of val images")
    s.add_argument("--seed", type=int, default=0)
    v = actions.add_parser("verify", help="check layout, pairs, sizes and label values")
    v.add_argument("dataset", choices=names)
    v.add_argument("--root", required=True, type=Path)
    dl = actions.add_parser("download", help="download (VOC) or unpack placed archives (Cityscapes)")
    dl.add_argument("dataset", choices=names)
    dl.add_argument("--root", required=True, type=Path)


def run(args) -> int:
    from deeplab_sweep.datasets.catalog import get_dataset
    from deeplab_sweep.errors import DatasetError

    spec = get_dataset(args.dataset)
    try:
        if args.action == "synth":
            counts = {k: v for k, v in (("n_train", args.train), ("n_val", args.val)) if v is not None}
            print(f"wrote synthetic {args.dataset} to {spec.synth(args.out, seed=args.seed, **counts)}")
            return 0
        if args.action == "verify":
            return _verify(args.dataset, args.root)
        print(f"{args.dataset} ready under {spec.download(args.root)}")
        return 0
    except DatasetError as e:  # the data is wrong, not the command line: exit 1
        print(f"error: {e}", file=sys.stderr)
        return 1


def _verify(name: str, root: Path) -> int:
    from deeplab_sweep.datasets.verify import verify

    report = verify(name, root)
    for split, n in report.counts.items():
        print(f"{split}: {n} image/mask pairs")
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if report.ok:
        print(f"{name} at {root}: OK")
    return 0 if report.ok else 1
