"""Build real published Mamba-family backbones on the meta device and print their sizes.

Run: .venv/bin/python benchmarks/presets_on_meta.py
No parameter memory is allocated: the models are built on torch.device("meta").
"""

import resource
import time

from mimo_builder._internal.platform.launch import launch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_on_meta(preset_name: str):
    from mimo_builder._internal.kinds import distributed
    from mimo_builder._internal.platform import compat
    from mimo_builder._internal.placement import Layout, create_process_groups
    from submodels import mamba_presets

    compat.init_runtime("cpu")
    layout = Layout(0, 1)
    pgs = create_process_groups([layout]).for_layout(layout)
    compat.seed_rng(0)
    preset = getattr(mamba_presets, preset_name)
    config = preset(transformer={**preset().transformer, "init_model_with_meta_device": True})
    before, start = _rss_mb(), time.perf_counter()
    builder = config.make_builder()
    (model,) = distributed.build_chunks(builder.build_model, builder.transformer_config(pgs), pgs)
    seconds = time.perf_counter() - start
    return sum(p.numel() for p in model.parameters()), seconds, _rss_mb() - before


if __name__ == "__main__":
    print(f"{'preset':<16} {'parameters':>16} {'build s':>8} {'+RSS MB':>8}")
    for name in ("mamba2_2p7b", "nemotron_h_8b"):
        count, seconds, rss = launch(build_on_meta, 1, name)[0]
        print(f"{name:<16} {count:>16,} {seconds:>8.2f} {rss:>8.0f}")
