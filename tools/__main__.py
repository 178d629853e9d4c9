"""`python -m tools`: the `fedfusion` command."""

import sys

from tools.cli import main

sys.exit(main())
