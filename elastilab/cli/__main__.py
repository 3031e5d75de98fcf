"""``python -m elastilab.cli`` (e.g. under torchrun) is the ``elastilab`` command."""
import sys

from elastilab.cli.main import main

sys.exit(main())
