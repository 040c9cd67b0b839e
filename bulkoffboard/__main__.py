"""``python -m bulkoffboard``."""

import sys

from bulkoffboard.cli import main

sys.exit(main())
