"""Gradient compression: codecs (none, fp16, int8, topk, topk_fp16) with exact, sync-free top-k selection
on the gradient's device, error feedback, and `GradientCompressor`, which the DDP comm hook calls
per bucket."""

from macfleet.compression.codecs import Codec, FP16Codec, Int8Codec, NoneCodec, TopKCodec, build_codec, keep_count
from macfleet.compression.compressor import GradientCompressor
from macfleet.compression.feedback import ErrorFeedback, warmup_ratio

__all__ = [
    "Codec", "NoneCodec", "FP16Codec", "Int8Codec", "TopKCodec", "build_codec", "keep_count",
    "GradientCompressor", "ErrorFeedback", "warmup_ratio",
]
