"""Config files (`--config`, `config init`, `config show`) and the run record every run
with an output folder leaves in OUT/runs/."""

from __future__ import annotations

import json

import h5py
import yaml

from wsi_embed.run_config import hoist_config

from .conftest import CMU, cli


def _records(out):
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_a_config_file_sets_options_flags_override_and_the_run_is_recorded(tmp_path):
    cfg = tmp_path / "project.yaml"
    cfg.write_text("tile:\n  patch-size: 128\n  min_tissue: 0.6\n  num_workers: 0\n")
    r = cli("--config", cfg, "tile", CMU, "--out", tmp_path / "o", "--min-tissue", "0.3")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "o" / "coords" / "CMU-1-Small-Region.h5") as f:
        attrs = dict(f["coords"].attrs) | dict(f.attrs)
    assert int(attrs["tiling_patch_size"]) == 128  # from the file
    assert float(attrs["tiling_min_tissue"]) == 0.3  # the flag wins
    (rec,) = _records(tmp_path / "o")
    assert rec["command"] == "tile" and rec["exit_code"] == 0 and rec["config"] == str(cfg)
    assert rec["options"]["patch_size"] == 128 and rec["options"]["min_tissue"] == 0.3
    assert rec["counts"]["ok"] == 1 and rec["versions"]["wsi_embed"]
    assert rec["versions"]["openslide_library"] and rec["devices"]
    assert rec["started"] <= rec["ended"]


def test_toml_unknown_keys_and_the_hoisted_form(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text("[train]\nepocs = 3\n")
    r = cli("--config", cfg, "train", "--features", tmp_path, "--labels", cfg, "--out",
            tmp_path / "m")
    assert r.exit_code == 2 and "'epocs'" in r.output and "did you mean 'epochs'" in r.output
    cfg.write_text("[extrct]\nencoder = 'uni_v1'\n")
    r = cli("--config", cfg, "info", CMU)
    assert r.exit_code == 2 and "did you mean 'extract'" in r.output
    assert hoist_config(["extract", "s.svs", "--config", "c.yaml", "--out", "o"]) == [
        "--config", "c.yaml", "extract", "s.svs", "--out", "o"]
    assert hoist_config(["tile", "--config=c.yaml"]) == ["--config", "c.yaml", "tile"]


def test_config_init_and_show(tmp_path):
    path = tmp_path / "t.yaml"
    r = cli("config", "init", path)
    assert r.exit_code == 0, r.output
    text = path.read_text()
    # every option commented out: a template that changes nothing, and a valid config
    assert not any(yaml.safe_load(text).values())
    r = cli("--config", path, "config", "show", "extract")
    assert r.exit_code == 0 and json.loads(r.output)["settings"]["extract"]["batch_size"] is None
    assert "\nextract:\n" in text and "  # batch_size: null" in text and "# epochs: 200" in text
    uncommented = "\n".join(line.replace("# ", "", 1) if line.startswith("  # epochs")
                            or line == "train:" else "" for line in text.splitlines())
    assert yaml.safe_load(uncommented) == {"train": {"epochs": 200}}
    assert cli("config", "init", path).exit_code == 2  # never overwrites by surprise
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 50\n")
    r = cli("--config", cfg, "config", "show", "train")
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["settings"]["train"]["epochs"] == 50
    assert shown["settings"]["train"]["patience"] == 20  # a default
