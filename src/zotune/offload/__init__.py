"""Streaming offload of decoder blocks from CPU memory (see :mod:`zotune.offload.session`, docs/offload.md)."""

from zotune.offload.checks import SUPPORTED, offload_refusal
from zotune.offload.session import OffloadError, StreamingOffload

__all__ = ["SUPPORTED", "OffloadError", "StreamingOffload", "offload_refusal"]
