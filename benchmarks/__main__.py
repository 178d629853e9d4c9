"""`python -m benchmarks`: run the benchmarks, print the table, write benchmarks/results/."""

import sys

from benchmarks.cli import main

sys.exit(main())
