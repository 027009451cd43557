"""`python -m loraplex.server ...` is `loraplex ...`."""

import sys

from loraplex.server.cli import main

sys.exit(main())
