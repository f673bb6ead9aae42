"""mimo-builder: compose multi-module models on Megatron-Core, one graph of per-node builders."""

from mimo_builder.platform.environment import prepare_before_megatron, quiet_import_notices

quiet_import_notices()  # before anything imports MCore: importing the library prints nothing
prepare_before_megatron()  # mamba-ssm's import attempt must precede MCore's Mamba modules
