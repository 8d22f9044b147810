"""`python -m yolov12_serve` = `yolov12-serve`."""

import sys

from .cli import main

sys.exit(main())
