"""`wsi-embed doctor`: one line per check, the fix for each failure, exit 1 on any."""

from __future__ import annotations

import shutil

from wsi_embed.doctor import check_out

from .conftest import cli


def test_doctor_finds_local_weights_and_names_the_fix_for_missing_ones(tmp_path, monkeypatch):
    weights = tmp_path / "w"
    (weights / "kaiko_vits16").mkdir(parents=True)
    (weights / "kaiko_vits16" / "model.safetensors").write_bytes(b"x")
    monkeypatch.setenv("WSI_EMBED_WEIGHTS", str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "out").mkdir()
    r = cli("doctor", "--encoder", "kaiko_vits16", "--out", tmp_path / "out", "--no-hub")
    assert r.exit_code == 0, r.output
    assert not any((tmp_path / "out").iterdir())  # it looks, it writes nothing there
    lines = r.output.splitlines()
    assert any(line.startswith("✓ weights kaiko_vits16") and "model.safetensors" in line
               for line in lines), r.output
    assert any(line.startswith("✓ openslide") for line in lines)
    assert any(line.startswith("✓ codec jpeg8") for line in lines)
    r = cli("doctor", "--encoder", "uni_v1", "--no-hub")
    assert r.exit_code == 1
    (line,) = [x for x in r.output.splitlines() if "weights uni_v1" in x]
    assert line.startswith("✗") and "MahmoodLab/UNI" in line and "gated" in line
    assert "$WSI_EMBED_WEIGHTS/uni_v1/" in line


def test_doctor_fails_a_full_out_and_refuses_unknown_encoders(tmp_path):
    free = shutil.disk_usage(tmp_path).free / 1e9
    check = check_out(tmp_path / "run", need_gb=free * 2)  # more than the disk has
    assert not check.ok and "GB free" in check.line() and "fix:" in check.line()
    assert check_out(tmp_path / "run", need_gb=0.001).ok
    r = cli("doctor", "--encoder", "nope", "--no-hub")
    assert r.exit_code == 2 and "unknown --encoder nope" in r.output
