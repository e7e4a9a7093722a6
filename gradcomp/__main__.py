"""``python -m gradcomp``: the ``gradcomp`` command (see :mod:`gradcomp.cli`)."""

import sys

from gradcomp.cli import main

sys.exit(main())
