"""``zotune bench gpu-check``: exercise every CUDA path on one GPU and write a report.

One command (``make gpu-check`` in a fresh checkout) that runs, on one GPU, in at most
8 minutes:

* ``noise_contract``: z on the GPU with ``noise_device="cpu"`` bit-equal to the CPU run's z
  (Gaussian and Rademacher, multi-block parameters), the native CUDA z reproducible and
  N(0, 1) / +-1, weights restored exactly;
* ``step_opt125m`` / ``step_1b``: F, step / 2F and peak memory / inference of ZO-SGD
  (Gaussian, Rademacher) and of MeZO's reference step, fp32 and bf16, for the OPT-125m and
  OPT-1.3b shapes (batch 16x64);
* ``offload``: ZO-SGD on a ~1.7 GB Llama shape with the decoder blocks streamed from CPU memory
  under a 1 GiB cap (``torch.cuda.set_per_process_memory_fraction``): fits, peak, tokens/s, uploads
  per step, losses and weights against the same steps in memory (without the cap);
* ``demo``: 10 steps of the README demo recipe through ``zotune train --device cuda``;
* ``data_parallel``: a one-process NCCL group, data-parallel steps equal to the plain run;
* ``fsdp2``: ``fully_shard_for_zo`` in that group, equal to the plain run.

Each section runs in its own Python process with its own time limit (the limits sum to
``--max-seconds``), so a CUDA error, a crash or a hang in one is recorded in the report and
the others still run. Without CUDA the same command runs the CPU parts (noise contract,
the tiny shape's step, gloo instead of NCCL) and marks the CUDA sections as skipped, with
the reason: that is what the default test suite and CI run.

The report goes to ``--out DIR``: ``gpu-check.json`` (every figure) and ``gpu-check.md``.
Exit status: 0 when no section failed, 1 otherwise; 2 for a usage error.

Example::

    zotune bench gpu-check --out runs/gpu-check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from zotune.bench._common import markdown_table, module_main, write_json
from zotune.errors import UserError

DESCRIPTION = __doc__.split("\n\n")[0]
RESULT_FILE = "gpu-check.json"
MARKDOWN_FILE = "gpu-check.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", required=True, help="directory for gpu-check.json and gpu-check.md")
    parser.add_argument("--sections", nargs="+", metavar="NAME", default=None,
                        help="run only these sections (default: all; see the module docstring)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when a GPU is visible, else the CPU parts (default: auto)")
    parser.add_argument("--max-seconds", type=float, default=480.0,
                        help="time budget of the whole check; each section's limit is scaled to it (default: 480)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    parser.add_argument("--in-process", action="store_true",
                        help="run the sections in this process, without time limits (faster start; a crash or hang "
                             "then stops the check: the default runs each section in its own process)")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child process: run one section
    parser.add_argument("--section-out", default=None, help=argparse.SUPPRESS)


def run_section_here(name: str, device: str, out_dir: Path) -> dict[str, Any]:
    """Run one section in this process and return its record (status ok/failed/skipped)."""
    from zotune.bench import gpu_sections as gs

    fn = gs.SECTIONS[name][0]
    t0 = time.perf_counter()
    try:
        res = fn(gs.Context(device, out_dir, _repo_root()))
        failed = [c["name"] for c in res["checks"] if not c["passed"]]
        rec = {"status": "failed" if failed else "ok", **res}
        if failed:
            rec["error"] = "checks failed: " + "; ".join(failed)
    except gs.Skip as e:
        rec = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # recorded, never fatal to the other sections
        rec = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _repo_root() -> Path | None:
    """The checkout holding configs/ (None for an installed package outside a checkout)."""
    import zotune

    for parent in Path(zotune.__file__).resolve().parents:
        if (parent / "configs" / "demo.yaml").exists():
            return parent
    return None


def run_section_process(name: str, device: str, out_dir: Path, limit_s: float) -> dict[str, Any]:
    """Run one section in a fresh interpreter with a time limit; a crash or timeout becomes a failed record."""
    result_path = out_dir / "sections" / f"{name}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "zotune.bench.gpu_check", "--section", name, "--section-out", str(result_path),
           "--device", device, "--out", str(out_dir)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-600:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "failed", "error": f"timed out after {limit_s:.0f} s", "stderr_tail": tail,
                "seconds": time.perf_counter() - t0}
    (out_dir / "sections" / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if result_path.exists():
        rec = json.loads(result_path.read_text())
    else:
        rec = {"status": "failed", "error": f"the section process exited {proc.returncode} without a result",
               "stderr_tail": proc.stderr[-800:]}
    rec["process_seconds"] = time.perf_counter() - t0
    return rec


def plan(names: list[str], cuda: bool, max_seconds: float) -> list[tuple[str, float | None, str | None]]:
    """(section, time limit, skip reason) per section; CUDA-only sections are skipped without CUDA."""
    from zotune.bench.gpu_sections import SECTIONS

    runnable = [n for n in names if cuda or not SECTIONS[n][1]]
    scale = max_seconds / (sum(SECTIONS[n][2] for n in runnable) or 1)  # the limits of what runs sum to the budget
    out: list[tuple[str, float | None, str | None]] = []
    for n in names:
        _, cuda_only, limit = SECTIONS[n]
        if cuda_only and not cuda:
            out.append((n, None, "no CUDA device visible (torch.cuda.is_available() is False)"))
        else:
            out.append((n, limit * scale, None))
    return out


def format_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: the environment, one line per section, the measured tables."""
    env = report["sections"].get("environment", {}).get("data", {})
    lines = ["# zotune GPU check", "", f"Command: `{report['command']}`; device: **{report['device']}**; "
             f"{report['seconds']:.0f} s in all.", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    rows = []
    for name, rec in report["sections"].items():
        note = rec.get("reason") or rec.get("error") or "; ".join(
            f"{'ok' if c['passed'] else 'FAILED'}: {c['name']}" for c in rec.get("checks", []))
        rows.append([name, rec["status"], f"{rec.get('seconds', 0):.1f}", note.replace("|", "/").replace("\n", " ")])
    lines += [markdown_table(["section", "status", "s", "checks / reason"], rows), ""]
    for name, rec in report["sections"].items():
        for r in rec.get("data", {}).get("results", []):
            lines += [f"## {name}: {r['shape']} {r['dtype']} ({r['params']:,} parameters, batch {r['batch']}, "
                      f"F = {r['forward_ms']:.2f} ms)", ""]
            lines.append(markdown_table(
                ["method", "step ms", "step / 2F", "x faster than MeZO ref", "peak GiB", "peak / inference"],
                [[k, f"{v['step_ms']:.2f}", f"{v['step_over_2F']:.3f}", f"{v['speedup_vs_mezo_reference']:.2f}",
                  "—" if v["peak_gib"] is None else f"{v['peak_gib']:.3f}",
                  "—" if v["peak_over_inference"] is None else f"{v['peak_over_inference']:.4f}"]
                 for k, v in r["rows"].items()]))
            lines.append("")
    return "\n".join(lines)


def run_check(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Run the planned sections one by one and write the report; return it."""
    import torch

    from zotune.bench.gpu_sections import SECTIONS

    out = Path(args.out)
    if (out / RESULT_FILE).exists() and not args.overwrite:
        raise UserError(f"{out / RESULT_FILE} exists; pass --overwrite or choose another --out")
    names = args.sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda but torch.cuda.is_available() is False; use --device auto or cpu")
    device = "cuda" if cuda else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"command": "zotune bench gpu-check " + " ".join(_cli_args(args)), "device": device,
                              "isolation": "in-process" if args.in_process else "one process per section",
                              "sections": {}}
    for name, limit, skip in plan(names, cuda, args.max_seconds):
        if skip is not None:
            report["sections"][name] = {"status": "skipped", "reason": skip, "seconds": 0.0}
        else:
            log(f"  {name} (limit {limit:.0f} s) ..." if not args.in_process else f"  {name} ...")
            report["sections"][name] = (run_section_here(name, device, out) if args.in_process
                                        else run_section_process(name, device, out, limit))
        log(f"  {name}: {report['sections'][name]['status']}"
            + (f" ({report['sections'][name].get('reason') or report['sections'][name].get('error', '')})"
               if report["sections"][name]["status"] != "ok" else ""))
    report["seconds"] = time.perf_counter() - t0
    report["failed"] = [n for n, r in report["sections"].items() if r["status"] == "failed"]
    report["skipped"] = {n: r.get("reason") for n, r in report["sections"].items() if r["status"] == "skipped"}
    write_json(out / RESULT_FILE, report)
    (out / MARKDOWN_FILE).write_text(format_markdown(report) + "\n")
    return report


def _cli_args(args: argparse.Namespace) -> list[str]:
    parts = ["--out", str(args.out)]
    if args.sections:
        parts += ["--sections", *args.sections]
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.in_process:
        parts.append("--in-process")
    return parts


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zotune bench gpu-check`` (and of its per-section child processes)."""
    if args.section:
        rec = run_section_here(args.section, args.device, Path(args.out or "."))
        write_json(args.section_out, rec)
        return 0
    report = run_check(args)
    print(f"\nwrote {Path(args.out) / RESULT_FILE} and {Path(args.out) / MARKDOWN_FILE} "
          f"({report['seconds']:.0f} s, device {report['device']})")
    if report["skipped"]:
        print("skipped: " + "; ".join(f"{n} ({why})" for n, why in report["skipped"].items()))
    if report["failed"]:
        print("FAILED: " + ", ".join(report["failed"]), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zotune.bench.gpu_check ...`` (same options as ``zotune bench gpu-check``)."""
    return module_main("gpu_check", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
