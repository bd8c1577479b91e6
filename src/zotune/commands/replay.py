"""``zotune replay``: rebuild a fine-tune's weights from its base model and trajectory file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
Rebuild the trained weights of a run from the base model and the run's trajectory.zot (every
step's direction seeds, loss values, projected gradients and lr), bit-identically, with no
data and no forward pass. The trajectory file is all a fine-tune needs to be shared.

examples:
  zotune replay runs/sst2-mezo/trajectory.zot --output runs/sst2-mezo-replayed
  zotune replay run.zot --model path/to/base --steps 500 --output replayed
  zotune eval --checkpoint runs/sst2-mezo-replayed      # evaluate the rebuilt weights

It writes config.json and checkpoint/trainable.safetensors into --output, as a run does.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trajectory", help="a trajectory.zot file, or a run directory holding one")
    parser.add_argument("--output", "-o", required=True, help="directory to write the rebuilt weights into")
    parser.add_argument("--model", help="the base model (default: the one the run was trained from)")
    parser.add_argument("--steps", type=int, help="replay only the first N steps (default: all)")


def run(args: argparse.Namespace) -> int:
    from zotune import trajectory as zotraj
    from zotune.checkpoint import save_trainable
    from zotune.errors import UserError
    from zotune.train import TrainConfig, build_model

    path = Path(args.trajectory)
    if path.is_dir():
        path = path / zotraj.FILENAME
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out} exists and is not an empty directory; choose another --output")
    if args.steps is not None and args.steps < 0:
        raise UserError("--steps must be >= 0")
    header, records = zotraj.read(path)
    zotraj.check_noise(header, path)
    saved = header["config"]
    config = TrainConfig.from_dict({k: v for k, v in saved.items() if k in TrainConfig.field_names()})
    config.resume = config.overwrite = False
    if args.model:
        config.model = args.model
    model, _ = build_model(config)
    records = records[: args.steps] if args.steps is not None else records
    optimizer = zotraj.replay(path, header, records, model)
    out.mkdir(parents=True, exist_ok=True)
    save_trainable(model, out / "checkpoint")
    (out / "config.json").write_text(json.dumps({**saved, "replayed_steps": len(records)}, indent=2))
    print(f"zotune replay: {len(records)} steps of {header['optimizer']} replayed "
          f"({optimizer.zo_state['skipped_steps']} skipped); weights in {out / 'checkpoint'}",
          file=sys.stderr)
    return 0
