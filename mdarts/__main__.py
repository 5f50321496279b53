"""``python -m mdarts``: the ``mdarts`` command (:func:`mdarts.cli.main`) without the installed script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
