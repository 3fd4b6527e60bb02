"""What a new user meets first: help, version, one-line refusals before any work."""

from __future__ import annotations

import json

import pytest
import torch
import typer.main

from wsi_embed.cli import app

from .conftest import CMU, KIDNEY, cli, copy


def test_every_option_of_every_command_says_what_it_does():
    missing = {name: [p.opts[0] for p in c.params if p.param_type_name == "option"
                      and not getattr(p, "help", None)]
               for name, c in typer.main.get_command(app).commands.items()}
    assert not {k: v for k, v in missing.items() if v}


def test_version_and_short_help():
    r = cli("--version")
    assert r.exit_code == 0 and r.output.startswith("wsi-embed ")
    r = cli("-h")
    assert r.exit_code == 0 and "extract" in r.output and "train" in r.output
    r = cli("train", "-h")
    assert r.exit_code == 0 and "--epochs" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path):
    r = cli("extract", CMU, "--out", tmp_path / "o", "--encoder", "kaiko_vits16", "--weights",
            "random", "--device", "cuda")
    assert r.exit_code == 2 and "no usable CUDA device" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_negative_workers_are_refused(tmp_path):
    r = cli("tile", CMU, "--out", tmp_path / "o", "--num-workers", "-3")
    assert r.exit_code == 2 and "--num-workers -3" in r.output


def test_info_takes_folders_and_says_n_a(tmp_path):
    copy(CMU, tmp_path / "a" / "cmu.svs")
    copy(KIDNEY, tmp_path / "a" / "kidney.tif")
    r = cli("info", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "cmu.svs" in r.output and "kidney.tif" in r.output
    assert "mpp: 0.499 (" in r.output and "mpp: n/a" in r.output and "None" not in r.output
    r = cli("info", tmp_path / "a" / "cmu.svs", "--json")
    assert json.loads(r.output)["vendor"] == "aperio"
