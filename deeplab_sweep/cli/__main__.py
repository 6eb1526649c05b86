from deeplab_sweep.cli import entry

entry()
