"""The project's exception hierarchy: one base, one subclass per kind of mistake."""


class MimoError(Exception):
    """Base of every error mimo-builder raises on purpose."""


class ConfigError(MimoError, ValueError):
    """A configuration document or value is invalid; the message names where and how to fix it."""


class GraphError(MimoError, ValueError):
    """A graph document is invalid; carries every problem found, not only the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"graph is invalid ({len(self.problems)} problem(s)):\n{lines}")


class DependencyError(MimoError, ImportError):
    """An optional dependency is missing; the message names the install command."""

