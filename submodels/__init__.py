"""One file per kind of node (knows no graph)."""

import mimo_builder  # noqa: F401  (first: its import hides the optional-package notices of MCore)
