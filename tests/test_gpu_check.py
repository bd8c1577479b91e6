"""``zotune bench gpu-check`` in its CPU mode (what CI runs): the CPU parts run and pass, the
CUDA-only parts are reported as skipped with the reason, and a failing, crashing or hanging
section is recorded without stopping the others."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from zotune.bench import gpu_check as gc
from zotune.bench import gpu_sections as gs
from zotune.errors import UserError

CPU_SECTIONS = ["environment", "noise_contract", "step_opt125m", "data_parallel", "fsdp2"]
CUDA_ONLY = ["step_1b", "offload", "demo"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gc.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_sections_table_matches_the_budget():
    assert set(gs.SECTIONS) == set(CPU_SECTIONS) | set(CUDA_ONLY)
    assert sum(limit for _, _, limit in gs.SECTIONS.values()) <= 480  # the 8 minutes on one GPU
    cpu_plan = gc.plan(list(gs.SECTIONS), cuda=False, max_seconds=480)
    skipped = {n for n, _, why in cpu_plan if why}
    assert skipped == set(CUDA_ONLY)
    assert sum(limit for _, limit, _ in cpu_plan if limit) == pytest.approx(480)
    assert all(why is None for _, _, why in gc.plan(list(gs.SECTIONS), cuda=True, max_seconds=480))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU mode")
def test_cpu_mode_end_to_end(tmp_path, capsys):
    """Every section in this process (one interpreter start instead of five on a 2-core CI machine);
    the per-section processes and their time limits are tested below."""
    out = tmp_path / "report"
    assert gc.run(parse("--out", str(out), "--in-process")) == 0
    report = json.loads((out / gc.RESULT_FILE).read_text())
    assert report["device"] == "cpu" and report["failed"] == []
    for name in CPU_SECTIONS:
        rec = report["sections"][name]
        assert rec["status"] == "ok", (name, rec)
        assert rec["checks"] and all(c["passed"] for c in rec["checks"])
    for name in CUDA_ONLY:
        assert report["sections"][name]["status"] == "skipped"
        assert "no CUDA device" in report["sections"][name]["reason"]
    noise = {c["name"] for c in report["sections"]["noise_contract"]["checks"]}
    assert any("noise_device='cpu' is bit-equal" in n for n in noise)
    step = report["sections"]["step_opt125m"]["data"]["results"]
    assert [r["dtype"] for r in step] == ["float32", "bfloat16"]
    for r in step:
        assert set(r["rows"]) == {"ZOSGD/gaussian", "ZOSGD/rademacher", "mezo-reference"}
        assert all(v["step_over_2F"] > 0 for v in r["rows"].values())
    md = (out / gc.MARKDOWN_FILE).read_text()
    assert "| offload" in md and "skipped" in md
    assert "skipped: step_1b" in capsys.readouterr().out
    with pytest.raises(UserError, match="--overwrite"):  # an existing report is never overwritten silently
        gc.run(parse("--out", str(out)))


def test_a_failing_section_is_recorded(monkeypatch, tmp_path):
    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def failing_check(ctx):
        return {"checks": [gs.check("z matches", False, 0.5)], "data": {}}

    monkeypatch.setitem(gs.SECTIONS, "noise_contract", (broken, False, 60))
    rec = gc.run_section_here("noise_contract", "cpu", tmp_path)
    assert rec["status"] == "failed" and "illegal memory access" in rec["error"] and "Traceback" in rec["traceback"]
    monkeypatch.setitem(gs.SECTIONS, "noise_contract", (failing_check, False, 60))
    rec = gc.run_section_here("noise_contract", "cpu", tmp_path)
    assert rec["status"] == "failed" and rec["error"] == "checks failed: z matches"
    assert gc.run_section_here("offload", "cpu", tmp_path)["status"] == "skipped"


def test_section_processes_and_time_limits(tmp_path):
    rec = gc.run_section_process("environment", "cpu", tmp_path, limit_s=300)
    assert rec["status"] == "ok" and rec["data"]["device"] == "cpu"
    assert (tmp_path / "sections" / "environment.json").exists()
    rec = gc.run_section_process("environment", "cpu", tmp_path, limit_s=0.2)  # importing torch takes longer
    assert rec["status"] == "failed" and rec["error"].startswith("timed out after")


def test_usage_errors():
    with pytest.raises(UserError, match="unknown section"):
        gc.run_check(parse("--out", "unused", "--sections", "nope"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            gc.run_check(parse("--out", "unused", "--device", "cuda"))
