"""mimo-builder: compose multi-module models on Megatron-Core, one graph of per-node builders."""

from mimo_builder.platform.environment import quiet_import_notices

quiet_import_notices()  # before anything imports MCore: importing the library prints nothing

from mimo_builder.platform.compat import prepare_mamba_ssm_import  # noqa: E402

prepare_mamba_ssm_import()  # must precede every import of MCore's Mamba modules (see compat)
