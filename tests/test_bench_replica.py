"""``python -m jobs.bench serve --parts replica``: the replica's model path per device, no Ray."""

from __future__ import annotations

import sys

import torch


def test_replica_part_times_every_model_on_every_device_without_ray(capsys):
    """One row per model and device with a positive time in every column, the bundled model
    among them, the CPU row its own baseline (1.0x); it never imports Ray, so it runs on an
    accelerator machine that has none."""
    from jobs.bench.serve import main

    had_ray = "ray" in sys.modules
    assert main(["--parts", "replica", "--models", "tiny_bilstm", "--batches", "1", "2",
                 "--seconds", "0.05"]) == 0  # fmt: skip
    if not had_ray:
        assert "ray" not in sys.modules
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "(" in r]
    rows = [r for r in rows if not r.startswith("| model")]
    devices = 1 + torch.cuda.is_available()
    assert len(rows) == 2 * devices, rows
    assert any(r.startswith("| tiny_bilstm (random weights) |") for r in rows)
    assert any(r.startswith("| bundled (") for r in rows)
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        times = [float(c) for c in cells[3:-1]]
        assert len(times) == 4 and all(t > 0 for t in times), r  # decode, 2 batches, TTA
        if "| cpu (" in r:
            assert cells[-1] == "1.0x"
