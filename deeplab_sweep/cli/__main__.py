import sys

from deeplab_sweep.cli import main

sys.exit(main())
