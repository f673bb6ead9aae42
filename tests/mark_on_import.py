"""Leaves a mark when imported: used to prove that refused references import nothing."""

import os

os.environ["MIMO_TEST_MARK_IMPORTED"] = "1"


class NotABuilder:
    pass
