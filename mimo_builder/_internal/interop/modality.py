"""The MIMO modality container the export uses (imported only when exporting)."""

import warnings

with warnings.catch_warnings():
    # MCore's MIMO config warns at class definition, i.e. on import; MimoModel warns again when a
    # model is built, which is where a user of the experimental API should see it.
    warnings.filterwarnings("ignore", message="MimoModelConfig is experimental", category=UserWarning)
    from megatron.core.models.mimo.submodules.base import ModalitySubmodules


class EncoderModality(ModalitySubmodules):
    """MCore's ModalitySubmodules for any input modality: its encoder, then its input projection."""

    def decode(self, embeddings, data_batch):
        """Always raises NotImplementedError: an exported modality is input-only."""
        raise NotImplementedError("an exported modality has no decoder (the graph has no output modalities)")
