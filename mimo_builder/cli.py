"""Command line entry point (filled in by later modules)."""


def main(argv=None) -> int:
    raise SystemExit("mimo-builder: no commands yet")
