"""``python -m core COMMAND …`` is ``lesionlab COMMAND …`` without the installed script."""

import sys

from core.cli.main import main

sys.exit(main())
