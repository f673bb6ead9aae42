"""Small node configs shared by the ready graphs (sizes fit CPU tests and the demo)."""

from submodels.audio import AudioConfig
from submodels.mamba import MambaConfig
from submodels.projector import ProjectorConfig
from submodels.vision import VisionConfig

HIDDEN = 64
IMAGE_TOKEN, AUDIO_TOKEN = 1, 2


def vision() -> VisionConfig:
    """A 2-layer ViT over 32 px images in 8 px patches (16 patches + class token)."""
    return VisionConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, image_size=32, patch_size=8)


def audio() -> AudioConfig:
    """A 2-layer audio encoder over 16 mel bins, at most 64 frames (32 tokens)."""
    return AudioConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, n_mels=16, max_frames=64)


def projector() -> ProjectorConfig:
    """An MLP projector from HIDDEN to HIDDEN features through 2 * HIDDEN."""
    return ProjectorConfig(input_size=HIDDEN, output_size=HIDDEN, ffn_hidden_size=2 * HIDDEN)


def backbone(**modalities: int) -> MambaConfig:
    """A 4-layer hybrid LM ('M*-M', 256 tokens, rope); ``modalities`` maps input port -> placeholder token id."""
    return MambaConfig(
        num_layers=4, hidden_size=HIDDEN, num_attention_heads=4, hybrid_layer_pattern="M*-M",
        vocab_size=256, make_vocab_size_divisible_by=1, seq_length=128, position_embedding_type="rope",
        mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, modality_token_ids=modalities,
    )
