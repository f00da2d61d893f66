#!/usr/bin/env python3
"""The simulator from this source tree, installed or not:

    python3 clients/python/simulate.py --token change-me --users 500 --speed 720 --duration 120

is ``python -m botmetrics.simulate`` (see src/botmetrics/simulate.py) for
scripts that run from a checkout, such as scripts/e2e.sh.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from botmetrics.simulate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
