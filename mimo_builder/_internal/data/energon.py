"""Megatron-Energon datasets as a :class:`~mimo_builder._internal.data.loader.SampleSource`.

An energon dataset is a folder of WebDataset tars prepared with energon's metadata (``.nv-meta``,
written by ``energon prepare``). Energon splits a dataset among data-parallel ranks with a
``WorkerConfig(rank, world_size)``; :class:`EnergonSource` gives each chunk of the global batch
its own energon loader as rank ``c`` of ``world_size = layout.num_chunks``, so a rank opens only
the chunks it reads, and every rank asking for chunk ``c`` of step ``s`` gets the same samples.

Energon needs the optional extra: ``pip install 'mimo-builder[energon]'``.
"""

from __future__ import annotations

import gc
import sys
import warnings
from typing import Any, Callable

from mimo_builder._internal.data.energon_state import decode, encode
from mimo_builder._internal.data.collate import DataError
from mimo_builder._internal.errors import DependencyError
from mimo_builder._internal.runtime.shards import BatchLayout

INSTALL = "pip install 'mimo-builder[energon]'"


IMAGE_TAG = "<image>"


def caption_sample(sample: Any, *, image_key: str = "pixel_values", prompt: str = "<image>") -> dict:
    """Energon's ``CaptioningSample`` (image + caption) or ``ImageClassificationSample`` (image +
    label) as a collator sample: the ``[C, H, W]`` image under ``image_key``, ``prompt`` (with its
    modality tag) before the text, and the caption (or label name, else label) as the answer.
    A ``VQASample`` goes to :func:`vqa_sample`, an ``InterleavedSample`` to
    :func:`interleaved_sample` (``prompt`` unused). Other layouts: pass
    ``functools.partial(caption_sample, image_key=..., prompt=...)`` or your own ``to_sample``."""
    energon = sys.modules.get("megatron.energon")  # an energon sample's class is loaded, so is its package
    if energon is not None and isinstance(sample, energon.VQASample):
        return vqa_sample(sample, image_key=image_key)
    if energon is not None and isinstance(sample, energon.InterleavedSample):
        return interleaved_sample(sample, image_key=image_key)
    if hasattr(sample, "caption"):
        answer = sample.caption
    elif getattr(sample, "label_name", None) is not None:
        answer = sample.label_name
    elif getattr(sample, "label", None) is not None:
        answer = str(sample.label)
    else:
        raise DataError(f"caption_sample reads energon samples with an image and a caption or label, not "
                        f"{type(sample).__name__}: give EnergonSource(to_sample=...) a converter")
    return {image_key: sample.image, "prompt": prompt, "answer": answer}


def vqa_sample(sample: Any, *, image_key: str = "pixel_values") -> dict:
    """Energon's ``VQASample`` as a collator sample: the image (a list of one) under ``image_key``,
    a user turn ``"<image>\n" + context`` (the context as it is where it holds its own ``<image>``
    tag) and an assistant turn with the answer: the one of highest ``answer_weights`` where given,
    else the first of ``answers`` (or ``answers`` itself, a string). No answers (a test split): the
    user turn alone."""
    context = sample.context
    question = context if IMAGE_TAG in context else f"{IMAGE_TAG}\n{context}"
    messages = [{"role": "user", "content": question}]
    answer = _best_answer(sample)
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {image_key: [sample.image], "messages": messages}


def _best_answer(sample: Any) -> str | None:
    answers = sample.answers
    if answers is None or isinstance(answers, str):
        return answers
    if not answers:
        return None
    weights = getattr(sample, "answer_weights", None)
    if weights is None:
        return answers[0]
    weights = [float(w) for w in weights]
    if len(weights) != len(answers):
        raise DataError(f"VQA sample {getattr(sample, '__key__', '')!r}: {len(answers)} answers but "
                        f"{len(weights)} answer_weights")
    return answers[max(range(len(answers)), key=weights.__getitem__)]  # the first of the highest


def interleaved_sample(sample: Any, *, image_key: str = "pixel_values") -> dict:
    """Energon's ``InterleavedSample`` (``sequence``: text pieces and ``[C, H, W]`` image tensors) as
    a collator sample: the images, in order, under ``image_key``; the pieces joined by newlines
    into a user turn, an ``<image>`` tag where each image stands. Where the sequence ends with a
    text piece after at least one other piece, that last piece is the assistant's answer instead;
    otherwise (it ends with an image, or holds one piece) the user turn alone."""
    pieces, images = [], []
    for k, piece in enumerate(sample.sequence):
        if isinstance(piece, str):
            pieces.append(piece)
        elif hasattr(piece, "shape") and len(piece.shape) == 3:
            pieces.append(IMAGE_TAG)
            images.append(piece)
        else:
            raise DataError(f"interleaved sample {getattr(sample, '__key__', '')!r}: sequence[{k}] "
                            f"({type(piece).__name__}) is neither text nor a [C, H, W] image")
    if not pieces:
        raise DataError(f"interleaved sample {getattr(sample, '__key__', '')!r}: its sequence is empty")
    ends_with_text = isinstance(sample.sequence[-1], str) and len(pieces) > 1
    user = pieces[:-1] if ends_with_text else pieces
    messages = [{"role": "user", "content": "\n".join(user)}]
    if ends_with_text:
        messages.append({"role": "assistant", "content": pieces[-1]})
    return {**({image_key: images} if images else {}), "messages": messages}


class EnergonSource:
    """Samples of an energon dataset folder (``path``, prepared with ``energon prepare``).

    Chunk ``c`` of ``C = layout.num_chunks`` reads through its own energon loader as data-parallel
    rank ``c`` of ``C``, in batches of ``layout.chunk_size``; energon's samples become collator
    samples through ``to_sample`` (default :func:`caption_sample`), called in energon's workers.
    ``split`` names energon's split part (read in training order whatever its name); ``seed``
    (energon's ``seed_offset``), ``shuffle_buffer_size`` and ``max_samples_per_sequence`` go to
    energon's ``get_train_dataset``.

    - **Sizes.** Energon cuts the split's samples (not its tar files) into ``C * max(1, num_workers)``
      contiguous slices, one per loader worker; every slice must hold a sample, so each dataset of
      the split needs at least that many samples (checked, :class:`DataError` with the numbers).
      Tar files matter for ``energon prepare --split-ratio``, which gives whole tars to
      train/val/test. ``num_workers`` and ``seed`` must be the same on every rank: they decide
      which samples a chunk holds.
    - **Order.** Each chunk reads its own slice in energon's training order, repeating forever:
      its sequences (``max_samples_per_sequence`` samples each; default the whole slice) in a
      seeded order per epoch, optionally through a ``shuffle_buffer_size`` buffer. The ``C``
      chunks' slices are disjoint, so no two chunks give the same sample in one pass.
    - **Steps are sequential.** A source asked for step ``s`` after ``s - 1`` continues; asked for
      a later step first, it reads and drops that chunk's batches before ``s``; asked for an earlier
      step, it starts the chunk over. The same step again is served from memory.
    - **Resume.** :meth:`state` is a chunk's position and energon's own loader state (JSON values,
      :mod:`mimo_builder._internal.data.energon_state`); a resumed run :meth:`restore` puts it back and reads on from
      there, the samples a straight run would read, without reading the steps before again.
    - **Workers.** ``num_workers`` energon worker processes per chunk the rank reads (persistent
      while the source lives); ``0`` reads in the calling process. RankLoader reads this source in
      the rank's own process (``sequential``).
    - **Errors.** A sample that fails to decode or convert raises; energon's default of logging
      and skipping it is turned off, so no sample disappears silently.
    """

    sequential = True

    def __init__(self, path, to_sample: Callable[[Any], dict] | None = None, *, split: str = "train",
                 num_workers: int = 0, seed: int = 0, shuffle_buffer_size: int | None = None,
                 max_samples_per_sequence: int | None = None):
        self._energon = _import_energon()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.path, self.split, self.num_workers, self.seed = str(path), split, num_workers, seed
        self.to_sample = to_sample or caption_sample
        self._options = {"shuffle_buffer_size": shuffle_buffer_size,
                         "max_samples_per_sequence": max_samples_per_sequence}
        self.sizes = self._read_sizes()
        self._layout: BatchLayout | None = None
        self._chunks: dict[int, _ChunkReader] = {}

    def samples(self, step: int, chunk: int, layout: BatchLayout) -> list[dict]:
        """The ``layout.chunk_size`` samples of ``chunk`` in global batch ``step`` (1-based), read from this chunk's slice."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        if not 0 <= chunk < layout.num_chunks:
            raise ValueError(f"chunk {chunk} is not one of the layout's {layout.num_chunks} chunks")
        return self._reader(chunk, layout).batch(step)

    def state(self, chunk: int) -> dict | None:
        """Where ``chunk``'s reader stands (the last step read and energon's loader state, as JSON
        values), None before it read a step."""
        reader = self._chunks.get(chunk)
        return None if reader is None else reader.state()

    def restore(self, chunk: int, layout: BatchLayout, saved: dict) -> None:
        """Continue ``chunk`` from a :meth:`state` of a source with the same layout and options:
        energon's loader restored, the next step read is the one after the saved step."""
        self._reader(chunk, layout).restore(saved)

    def close(self) -> None:
        """End every chunk's loader (and its worker processes); a later read opens them again."""
        for reader in self._chunks.values():
            reader.close()
        self._chunks = {}
        gc.collect()  # energon's loader and its epoch iterator hold each other: a cycle ends them
    def _reader(self, chunk: int, layout: BatchLayout) -> "_ChunkReader":
        if layout != self._layout:
            self._check_size(layout.num_chunks)
            self._layout, self._chunks = layout, {}
        if chunk not in self._chunks:
            self._chunks[chunk] = _ChunkReader(lambda: self._open(chunk, layout))
        return self._chunks[chunk]

    def _worker_config(self, rank: int, world_size: int):
        return self._energon.WorkerConfig(rank=rank, world_size=world_size, num_workers=self.num_workers,
                                          seed_offset=self.seed,
                                          global_error_handler=self._energon.reraise_exception)

    def _read_sizes(self) -> list[int]:
        """Samples in each dataset of the split (one, unless ``path`` is an energon metadataset)."""
        from megatron.energon.flavors.webdataset.empty_dataset_error import EmptyDatasetError

        try:
            loaded = self._energon.load_dataset(self.path).get_datasets(
                training=True, split_part=self.split, worker_config=self._worker_config(0, 1),
                max_samples_per_sequence=self._options["max_samples_per_sequence"])
        except (OSError, ValueError, EmptyDatasetError) as e:
            raise DataError(f"cannot read split {self.split!r} of energon dataset {self.path}: {e} (prepare the "
                            f"folder with `energon prepare`; its --split-ratio gives whole tar files to each "
                            f"split)") from e
        return [len(d.dataset) for d in loaded.datasets]

    def _check_size(self, num_chunks: int) -> None:
        slices = num_chunks * max(1, self.num_workers)
        if min(self.sizes) < slices:
            raise DataError(f"energon dataset {self.path} split {self.split!r} holds {self.sizes} sample(s) per "
                            f"dataset; {num_chunks} chunk(s) x {max(1, self.num_workers)} worker(s) need at least "
                            f"{slices} in each (energon gives every loader worker its own slice)")

    def _open(self, chunk: int, layout: BatchLayout):
        """Energon's savable loader for ``chunk`` (not yet iterated)."""

        energon = self._energon
        dataset = energon.get_train_dataset(
            self.path, split_part=self.split, worker_config=self._worker_config(chunk, layout.num_chunks),
            batch_size=layout.chunk_size, task_encoder=_task_encoder(energon, self.to_sample), **self._options)
        # In this process, energon's gc.freeze/collect would reach the whole training process.
        in_process = {"gc_collect_every_n_steps": 0, "gc_freeze_at_start": False} if not self.num_workers else {}
        with warnings.catch_warnings():  # energon always asks to pin memory; on CPU torch warns per loader
            warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator", category=UserWarning)
            return energon.SavableDataLoader(dataset, **in_process)


class _ChunkReader:
    """One chunk's batches in step order: continues, skips ahead, or starts over as asked; its
    energon loader's state can be saved after a step and restored into a fresh loader."""

    def __init__(self, open_loader: Callable[[], Any]):
        self._open, self._loader, self._batches, self._read = open_loader, None, None, 0
        self._last: list[dict] | None = None

    def batch(self, step: int) -> list[dict]:
        if step == self._read and self._batches is not None and self._last is not None:
            return self._last
        if self._batches is None or step <= self._read:
            self._start(None)
        while self._read < step:
            self._last = next(self._batches)
            self._read += 1
        return self._last

    def state(self) -> dict | None:
        if self._loader is None or self._read == 0:
            return None
        return {"step": self._read, "loader": encode(self._loader.save_state_rank())}

    def restore(self, saved: dict) -> None:
        self._start(decode(saved["loader"]))
        self._read = int(saved["step"])

    def close(self) -> None:
        self._loader, self._batches, self._read, self._last = None, None, 0, None

    def _start(self, state) -> None:
        self._loader = self._open()
        if state is not None:
            self._loader.restore_state_rank(state)
        with warnings.catch_warnings():  # energon always asks to pin memory; on CPU torch warns per loader
            warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator", category=UserWarning)
            self._batches = iter(self._loader)
        self._read, self._last = 0, None


def _task_encoder(energon, to_sample: Callable[[Any], dict]):
    """An energon task encoder that converts each sample with ``to_sample`` and batches nothing:
    a batch is the list of converted samples (the collator builds the tensors)."""

    class _Samples(energon.TaskEncoder):
        def encode_sample(self, sample):
            return to_sample(sample)

        def batch(self, samples):
            return list(samples)

    return _Samples()


def _import_energon():
    try:
        import megatron.energon as energon
    except ImportError as e:
        raise DependencyError(f"reading Megatron-Energon datasets needs the megatron-energon package "
                              f"({e}): {INSTALL}") from e
    return energon
