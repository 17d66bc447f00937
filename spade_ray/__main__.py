"""``python -m spade_ray``: the ``spade-ray`` command."""

import sys

from spade_ray.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
