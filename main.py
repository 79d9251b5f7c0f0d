#!/usr/bin/env python3
"""Learn a discretization (LD3): the few times at which the student solver should call the network. (the paper's command; the code is ``ld3.cli.main``, also installed as ``ld3-train``)."""

import sys

try:
    from ld3.cli.main import *  # noqa: F401,F403 - the module's names, as when this file held the code
    from ld3.cli.main import cli, main  # noqa: F401
except ImportError as e:  # a checkout without `make install`
    if getattr(e, "name", None) == "ld3":
        sys.exit("error: the ld3 package is not installed here: run `make install` (or pip install -e .) first")
    raise

if __name__ == "__main__":
    cli()
