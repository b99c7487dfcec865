"""`python -m fasttrain COMMAND ...`, the same as the `fasttrain` command."""

import sys

from fasttrain.cli import main

sys.exit(main())
