"""Real data for a graph: samples -> batches (:class:`GraphCollator`), read per rank
(:class:`RankLoader` over a :class:`SampleSource`), with a stand-in tokenizer."""

from mimo_builder._internal.data.collate import DataError, GraphCollator, arriving_tokens
from mimo_builder._internal.data.loader import IndexedSource, RankLoader, SampleSource
from mimo_builder._internal.data.spec import GraphData, load_data
from mimo_builder._internal.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["ByteTokenizer", "DataError", "GraphCollator", "GraphData", "HFTokenizer", "IndexedSource",
           "RankLoader", "SampleSource", "arriving_tokens", "load_data"]
