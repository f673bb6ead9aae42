"""Real data for a graph: samples -> batches (:class:`GraphCollator`), read per rank
(:class:`RankLoader` over a :class:`SampleSource`), with a stand-in tokenizer. Names load on
first use, so a module of this package (the tokenizers) imports without the collator."""

from mimo_builder._internal.lazy import LazyNames

_D = "mimo_builder._internal."
_NAMES = LazyNames(__name__, {
    "DataError": _D + "errors", "GraphCollator": _D + "data.collate",
    "IndexedSource": _D + "data.loader", "RankLoader": _D + "data.loader", "SampleSource": _D + "data.loader",
    "GraphData": _D + "data.spec", "load_data": _D + "data.spec",
    "ByteTokenizer": _D + "data.tokenizer", "HFTokenizer": _D + "data.tokenizer",
})

__all__ = sorted(_NAMES.names)


def __getattr__(name: str):
    return _NAMES.get(name)
