"""``python -m lorasc_tune.diagnostics OUTPUT_DIR [...]``."""

import sys

from lorasc_tune.diagnostics.cli import main

sys.exit(main())
