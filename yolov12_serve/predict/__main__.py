"""`python -m yolov12_serve.predict` = `yolov12-predict`."""

import sys

from .cli import main

sys.exit(main())
