"""`python -m simulations`: run the local multi-hospital simulation."""

import sys

from simulations.cli import main

sys.exit(main())
