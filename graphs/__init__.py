"""Ready graphs, declared in Python with YAML twins."""

import mimo_builder  # noqa: F401  (first: its import hides the optional-package notices of MCore)
