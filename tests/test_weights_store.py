"""`wsi-embed weights fetch|list`, with the hub download replaced by a local file."""

from __future__ import annotations

import json

import huggingface_hub

from wsi_embed.encoders import resolve_weights, sha256_file

from .conftest import cli


def test_fetch_once_into_the_weights_layout_then_every_command_finds_it(tmp_path,
                                                                        monkeypatch):
    blob = tmp_path / "hub" / "model.safetensors"
    blob.parent.mkdir()
    blob.write_bytes(b"pretend weights" * 100)
    calls = []

    def download(repo, filename, **kw):  # the hub: the one thing that cannot exist here
        calls.append((repo, filename))
        return str(blob)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    store = tmp_path / "weights"
    r = cli("weights", "fetch", "kaiko_vits16", "--to", store)
    assert r.exit_code == 0, r.output
    dest = store / "kaiko_vits16" / "model.safetensors"
    assert dest.read_bytes() == blob.read_bytes() and len(calls) == 1
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["kaiko_vits16"]["sha256"] == sha256_file(blob)
    r = cli("weights", "fetch", "kaiko_vits16", "--to", store)  # already there: no download
    assert r.exit_code == 0 and len(calls) == 1
    # the commands' lookup finds it without the hub
    res = resolve_weights("kaiko_vits16", None, {"WSI_EMBED_WEIGHTS": str(store)})
    assert res.path == dest
    r = cli("weights", "list", "--to", store)
    assert r.exit_code == 0 and "kaiko_vits16\tok" in r.output
    dest.write_bytes(b"damaged")
    r = cli("weights", "list", "--to", store)
    assert r.exit_code == 1 and "sha256 differs" in r.output


def test_fetch_failures_are_one_line(tmp_path, monkeypatch):
    def offline(repo, filename, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    r = cli("weights", "fetch", "uni_v1", "--to", tmp_path)
    assert r.exit_code == 2 and "gated" in r.output and "MahmoodLab/UNI" in r.output
    assert not (tmp_path / "uni_v1").exists()
    r = cli("weights", "fetch", "nope", "--to", tmp_path)
    assert r.exit_code == 2 and "unknown encoder nope" in r.output
    monkeypatch.delenv("WSI_EMBED_WEIGHTS", raising=False)
    r = cli("weights", "list")
    assert r.exit_code == 2 and "--to" in r.output
