"""Trajectory files: a fine-tune as the seeds and scalars of its steps (``trajectory.zot``).

A zeroth-order step moves the weights along directions that are a pure function of a seed
(:mod:`zotune.optim.noise`), by amounts that depend only on a few loss values and the lr. So a
whole fine-tune is the base model plus, per step, its direction seeds, the loss values the
method used, its projected gradient(s) and its lr: ``zotune replay`` rebuilds the trained
weights from them bit-identically, with no data and no forward pass
(:meth:`zotune.optim.ZOOptimizer.replay_step`).

Format: ``MAGIC``, a little-endian uint32 length and a JSON header (zotune version, noise and
base-model fingerprints, optimizer and its arguments, the run's config), then one record per
step: ``<IBBBB`` (step, #seeds, #losses, #projected gradients, #lrs) followed by the seeds
(uint64) and the float64 values. ``#lrs = 0`` means "the same lrs as the previous record", so
a ZO-SGD step takes 40 bytes (a 20,000-step run: 800 kB). A torn last record (what a kill
leaves) is ignored, and :func:`cut` drops the records after a checkpoint on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from zotune.errors import UserError
from zotune.optim.engine import StepRecord

FILENAME = "trajectory.zot"
MAGIC = b"ZOTUNE-TRAJECTORY\n"
FORMAT = 1
_HEAD = struct.Struct("<IBBBB")
#: config keys about where and how a run was started, not what it computes (kept out of the header)
_WHERE = ("output_dir", "resume", "overwrite", "progress", "threads", "device")


def noise_fingerprint(distribution: str, block_size: int) -> str:
    """A hash of what the noise contract produces for a few probes (changes if the noise does)."""
    from zotune.optim.noise import BlockLayout, block_seed, fill_noise, mix_seed

    h = hashlib.sha256()
    seed = mix_seed(0, 1, 2)
    h.update(seed.to_bytes(8, "little"))
    h.update(fill_noise(torch.empty(257), block_seed(seed, 3, 4, 0), distribution).numpy().tobytes())
    for shape in ((7,), (300, 5), (2, 3, block_size + 1)):
        h.update(repr(BlockLayout.for_shape(shape, block_size)).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter (frozen ones too: a LoRA fine-tune needs its exact base)."""
    from zotune.optim.lazy import flush_pending

    flush_pending(model)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def make_header(model: torch.nn.Module, optimizer, optimizer_kwargs: dict[str, Any],
                config: dict[str, Any]) -> dict[str, Any]:
    """The header of a new trajectory (call before the first step: it fingerprints the base)."""
    from zotune import __version__

    device = next((p.device.type for p in model.parameters() if p.requires_grad), "cpu")
    return {"format": FORMAT, "zotune": __version__,
            "noise": noise_fingerprint(optimizer.distribution, optimizer.block_size),
            "block_size": optimizer.block_size,
            "noise_device": str(optimizer.noise_device.type if optimizer.noise_device else device),
            "base": model_fingerprint(model), "optimizer": type(optimizer).__name__,
            "optimizer_kwargs": json.loads(json.dumps(optimizer_kwargs)),
            "config": {k: v for k, v in config.items() if k not in _WHERE}}


def encode(record: StepRecord, previous_lrs: list[float] | None) -> bytes:
    lrs = [] if previous_lrs == record.lrs else record.lrs
    values = [*record.losses, *record.projected_grads, *lrs]
    return (_HEAD.pack(record.step, len(record.seeds), len(record.losses), len(record.projected_grads), len(lrs))
            + struct.pack(f"<{len(record.seeds)}Q{len(values)}d", *record.seeds, *values))


class Writer:
    """Appends one record per step (flushed, so a kill loses at most the step being written)."""

    def __init__(self, path: Path, header: dict[str, Any] | None):
        """A new file with ``header``, or (``header=None``) the existing file, appended to."""
        self.path = path
        self.lrs: list[float] | None = None
        if header is None:
            for record in read(path)[1]:
                self.lrs = record.lrs
            self.file = open(path, "ab")  # noqa: SIM115
        else:
            blob = json.dumps(header).encode()
            self.file = open(path, "wb")  # noqa: SIM115
            self.file.write(MAGIC + struct.pack("<I", len(blob)) + blob)
            self.file.flush()

    def append(self, record: StepRecord) -> None:
        self.file.write(encode(record, self.lrs))
        self.file.flush()
        self.lrs = record.lrs

    def close(self) -> None:
        self.file.close()


def _records(data: bytes, offset: int) -> Iterator[tuple[int, StepRecord]]:
    """(end offset, record) for every complete record from ``offset`` on."""
    lrs: list[float] = []
    while offset + _HEAD.size <= len(data):
        step, ns, nl, ng, nr = _HEAD.unpack_from(data, offset)
        body = struct.Struct(f"<{ns}Q{nl + ng + nr}d")
        end = offset + _HEAD.size + body.size
        if end > len(data):
            return  # torn last record
        values = body.unpack_from(data, offset + _HEAD.size)
        seeds, floats = list(values[:ns]), list(values[ns:])
        lrs = floats[nl + ng :] if nr else lrs
        yield end, StepRecord(step, seeds, floats[:nl], floats[nl : nl + ng], list(lrs))
        offset = end


def _header(path: Path, data: bytes) -> tuple[dict[str, Any], int]:
    fix = "it is not a complete zotune trajectory file; give the trajectory.zot of a zotune run"
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise UserError(f"{path}: {fix}")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt header; {fix}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"{path}: format {header.get('format') if isinstance(header, dict) else '?'} "
                        f"is not {FORMAT}; replay it with the zotune version that wrote it")
    return header, start + n


def read(path: Path) -> tuple[dict[str, Any], list[StepRecord]]:
    """The header and the complete records of a trajectory file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read trajectory {path}: {e.strerror}") from None
    header, offset = _header(path, data)
    records = [r for _, r in _records(data, offset)]
    for i, r in enumerate(records):
        if r.step != i:
            raise UserError(f"{path}: record {i} is for step {r.step}; the file is corrupt")
    return header, records


def cut(path: Path, step: int) -> bool:
    """Keep the records of steps ``< step`` (a resume from the checkpoint at ``step``).

    Returns False if the file does not hold every step before ``step`` (then it cannot be
    continued).
    """
    data = path.read_bytes()
    _, end = _header(path, data)
    count = 0
    for offset, record in _records(data, end):
        if record.step >= step:
            break
        end, count = offset, count + 1
    with open(path, "r+b") as f:
        f.truncate(end)
        os.fsync(f.fileno())
    return count == step


def open_for_run(out: Path, resume_step: int | None, model, optimizer, optimizer_kwargs: dict[str, Any],
                 config: dict[str, Any]) -> Writer | None:
    """The trajectory writer of a training run: a new file, or the old one cut back to the checkpoint.

    Returns None (and the run records no trajectory) when a resumed run's file is missing or
    does not cover every step before the checkpoint.
    """
    path = out / FILENAME
    if resume_step is None:
        return Writer(path, make_header(model, optimizer, optimizer_kwargs, config))
    if not path.exists() or not cut(path, resume_step):
        path.unlink(missing_ok=True)
        return None
    return Writer(path, None)


def check_noise(header: dict[str, Any], path: Path) -> None:
    """Refuse a trajectory whose noise this zotune version (or device) cannot reproduce."""
    from zotune import __version__

    kwargs = header.get("optimizer_kwargs", {})
    mine = noise_fingerprint(kwargs.get("distribution", "gaussian"), recorded_block_size(header))
    if header.get("noise") != mine:
        raise UserError(f"{path} was written by zotune {header.get('zotune')}, whose perturbation noise differs "
                        f"from this zotune {__version__}'s; replay it with zotune {header.get('zotune')}")


def recorded_block_size(header: dict[str, Any]) -> int:
    """The noise block size the run used: the header's; in files older than that field, the run's
    ``block_size`` option or the CPU default (the only default before CUDA got its own)."""
    from zotune.optim.noise import DEFAULT_BLOCK_SIZE

    return int(header.get("block_size", header.get("optimizer_kwargs", {}).get("block_size", DEFAULT_BLOCK_SIZE)))


def replay(path: Path, header: dict[str, Any], records: list[StepRecord], model: torch.nn.Module):
    """Rebuild the trained weights in ``model`` (the base model) from ``records``; returns the optimizer."""
    import zotune.optim as zo

    found = model_fingerprint(model)
    if found != header["base"]:
        raise UserError(f"{path} was made for another base model (fingerprint {header['base']}, this one "
                        f"{found}); pass the base model the run started from with --model")
    # lazy: the same arithmetic as the eager run (bit-identical), one pass per step fewer
    optimizer = zo.get(header["optimizer"])(model, **{**header["optimizer_kwargs"], "lazy_update": True,
                                                      "block_size": recorded_block_size(header)})
    device = next((p.device.type for p in model.parameters() if p.requires_grad), "cpu")
    device = optimizer.noise_device.type if optimizer.noise_device is not None else device
    if header.get("noise_device", "cpu") != device:  # CUDA's Philox stream is not the CPU's
        raise UserError(f"{path} was trained with noise generated on {header['noise_device']}, this replay would "
                        f"generate it on {device}; replay on {header['noise_device']} (or train with "
                        "--opt noise_device=cpu)")
    for record in records:
        try:
            optimizer.replay_step(record)
        except ValueError as e:
            raise UserError(f"{path}: {e}; the file does not match this zotune version or model") from None
    optimizer.flush()
    return optimizer
