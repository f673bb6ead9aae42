"""mimo-builder: compose multi-module models on Megatron-Core, one graph of per-node builders."""

from mimo_builder.compat import prepare_mamba_ssm_import

prepare_mamba_ssm_import()  # must precede every import of MCore's Mamba modules (see compat)
