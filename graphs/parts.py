"""Small node configs shared by the ready graphs (sizes fit CPU tests and the demo)."""

from submodels.audio import AudioConfig
from submodels.mamba import MambaConfig
from submodels.projector import ProjectorConfig
from submodels.vision import VisionConfig

HIDDEN = 64
IMAGE_TOKEN, AUDIO_TOKEN = 1, 2


def vision() -> VisionConfig:
    return VisionConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, image_size=32, patch_size=8)


def audio() -> AudioConfig:
    return AudioConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, n_mels=16, max_frames=64)


def projector() -> ProjectorConfig:
    return ProjectorConfig(input_size=HIDDEN, output_size=HIDDEN, ffn_hidden_size=2 * HIDDEN)


def backbone(**modalities: int) -> MambaConfig:
    return MambaConfig(
        num_layers=4, hidden_size=HIDDEN, num_attention_heads=4, hybrid_layer_pattern="M*-M",
        vocab_size=256, make_vocab_size_divisible_by=1, seq_length=128, position_embedding_type="rope",
        mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, modality_token_ids=modalities,
    )
