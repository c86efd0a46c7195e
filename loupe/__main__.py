"""``python -m loupe`` = the ``loupe`` command."""

import sys

from loupe.cli.main import main

sys.exit(main())
