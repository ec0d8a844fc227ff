"""``python -m mnet_ext.train`` and ``torchrun ... -m mnet_ext.train``."""

import sys

from mnet_ext.train.cli import main

sys.exit(main())
