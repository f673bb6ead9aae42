"""mimo-builder's internals: private, and free to change in any release.

Import from :mod:`mimo_builder` (and :mod:`mimo_builder.kinds` to write a node kind) instead;
those names are public and move only through a deprecation warning (see ``CHANGELOG.md``).
The folders here read as the pipeline: ``document/ -> kinds/ -> validation -> placement ->
assembly/ -> runtime/``, beside ``planning/``, ``platform/``, ``checkpoint/``, ``data/``, ``hf/``,
``interop/`` and ``render/``.
"""
