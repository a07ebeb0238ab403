"""``python -m gemma4x`` runs the command line (see gemma4x.cli)."""

import sys

from gemma4x.cli import main

sys.exit(main())
