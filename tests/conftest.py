"""Shared test settings: offline, and one intra-op thread (tiny models gain nothing from more,
and OpenMP spinning makes them slow on a shared 2-core machine). Tests that check thread
independence set their thread counts explicitly."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

torch.set_num_threads(1)
