"""The shipped node kinds, one file per kind (knows no graph).

Their configs are public here: ``from submodels import MambaConfig, VisionConfig``. They load
on first use and import neither torch nor Megatron-Core (the builders do, when a graph is built).
"""

import mimo_builder  # noqa: F401  (first: its import hides the optional-package notices of MCore)
from mimo_builder._internal.lazy import LazyNames

_PUBLIC = LazyNames(__name__, {
    "MambaConfig": "submodels.mamba_config", "VisionConfig": "submodels.vision_config",
    "AudioConfig": "submodels.audio_config", "ProjectorConfig": "submodels.projector_config",
    "GPTConfig": "submodels.gpt_config",
})

__all__ = sorted(_PUBLIC.names)


def __getattr__(name: str):
    return _PUBLIC.get(name)


def __dir__() -> list[str]:
    return _PUBLIC.dir(globals())
