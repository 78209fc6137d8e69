#!/usr/bin/env python
"""Entry script for TPU VMs and local runs: `python decode/rast.py --config configs/X.yaml [flags]`.

The same as `jaxrast decode ...`; see `jaxrast decode --help`.
"""

import sys

from jaxrast.cli import main

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
