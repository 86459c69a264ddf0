"""`python -m worker.cli`: the `kling-worker` command."""

import sys

from worker.cli.commands import main

sys.exit(main())
