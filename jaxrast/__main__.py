"""`python -m jaxrast ...`: the same as the `jaxrast` command."""

import sys

from jaxrast.cli import main

if __name__ == "__main__":
    sys.exit(main())
