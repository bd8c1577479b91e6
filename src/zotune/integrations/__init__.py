"""Integrations with other training frameworks."""

from zotune.integrations.hf_trainer import ZOTrainer

__all__ = ["ZOTrainer"]
