"""Gradient compression: codecs (none, fp16, topk, topk_fp16), fast top-k selection, compact
index coding, error feedback, and `GradientCompressor`, which the DDP comm hook calls per bucket."""

from macfleet.compression.codecs import Codec, FP16Codec, NoneCodec, Selection, TopKCodec, build_codec
from macfleet.compression.compressor import GradientCompressor
from macfleet.compression.feedback import ErrorFeedback, warmup_ratio

__all__ = [
    "Codec", "NoneCodec", "FP16Codec", "TopKCodec", "Selection", "build_codec",
    "GradientCompressor", "ErrorFeedback", "warmup_ratio",
]
