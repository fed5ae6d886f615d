"""`python -m normpass ...` runs the `normpass` command."""

import sys

from normpass.cli import main

sys.exit(main())
