"""The encoder registry: every preset's architecture, weight loading and its errors."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from wsi_embed.encoders import (
    PRESETS,
    EncoderError,
    build_encoder,
    load_encoder,
    resolve_weights,
)

from .conftest import cli

BIG = {"uni_v1", "uni_v2", "conch_v1_5", "virchow", "virchow2", "h_optimus_0", "h_optimus_1",
       "gigapath", "phikon_v2", "midnight", "hibou_l", "gpfm", "kaiko_vitl14"}
REQUIRED = {"uni_v1", "uni_v2", "conch_v1", "conch_v1_5", "virchow2", "h_optimus_0",
            "h_optimus_1", "gigapath", "phikon", "phikon_v2", "ctranspath", "resnet50_trunc"}
PUBLISHED_DIM = {"uni_v1": 1024, "uni_v2": 1536, "conch_v1": 512, "conch_v1_5": 768,
                 "virchow2": 2560, "h_optimus_0": 1536, "h_optimus_1": 1536, "gigapath": 1536,
                 "phikon": 768, "phikon_v2": 1024, "ctranspath": 768, "resnet50_trunc": 1024,
                 "midnight": 3072, "virchow": 2560, "hibou_b": 768, "hibou_l": 1024,
                 "gpfm": 1024, "lunit_vits8": 384, "plip": 512, "kaiko_vits8": 384,
                 "kaiko_vitb8": 768, "kaiko_vitl14": 1024, "chief_ctranspath": 768}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_gives_its_published_dim(name):
    dev = "meta" if name in BIG else "cpu"
    model, cfg = build_encoder(name, dev)
    with torch.inference_mode():
        y = model(torch.zeros(2, 3, cfg.input_size, cfg.input_size, device=dev))
    assert tuple(y.shape) == (2, cfg.dim)
    if name in PUBLISHED_DIM:
        assert cfg.dim == PUBLISHED_DIM[name]


def test_required_presets_are_registered():
    assert REQUIRED <= set(PRESETS)


def test_tensor_shapes_that_decide_a_strict_load():
    sd = build_encoder("uni_v2", "meta")[0].state_dict()
    assert sd["trunk.pos_embed"].shape == (1, 256, 1536)
    assert sd["trunk.reg_token"].shape == (1, 8, 1536)
    assert sd["trunk.blocks.0.mlp.fc1.weight"].shape == (8192, 1536)
    assert sd["trunk.blocks.0.mlp.fc2.weight"].shape == (1536, 4096)
    v2, _ = build_encoder("virchow2", "meta")
    assert v2.state_dict()["trunk.pos_embed"].shape == (1, 261, 1280)
    assert v2.state_dict()["trunk.blocks.0.mlp.fc1.weight"].shape == (6832, 1280)
    assert v2.num_prefix == 5
    assert isinstance(v2.trunk.blocks[0].mlp.act, nn.SiLU)  # not GELU (ENCODERS.md §1.6)
    g = build_encoder("gigapath", "meta")[0].state_dict()
    assert g["trunk.pos_embed"].shape == (1, 197, 1536)
    assert g["trunk.patch_embed.proj.weight"].shape == (1536, 3, 16, 16)
    h = build_encoder("h_optimus_0", "meta")[0].state_dict()
    assert h["trunk.pos_embed"].shape == (1, 256, 1536)
    c = build_encoder("conch_v1_5", "meta")[0].state_dict()
    assert c["trunk.pos_embed"].shape == (1, 197, 1024)  # 14x14, as the reference builds it
    assert c["head.to_kv.weight"].shape == (1536, 1024)
    hl = build_encoder("hibou_l", "meta")[0]
    assert hl.state_dict()["trunk.blocks.0.mlp.fc1.weight"].shape == (5472, 1024)
    assert hl.state_dict()["trunk.reg_token"].shape == (1, 4, 1024) and hl.num_prefix == 5
    assert isinstance(hl.trunk.blocks[0].mlp.act, nn.SiLU)
    k = build_encoder("kaiko_vitl14", "meta")[0].state_dict()
    assert k["trunk.pos_embed"].shape == (1, 1369, 1024)  # the port's 37x37 grid
    p = build_encoder("plip")[0]
    assert p.trunk.patch_embed.proj.bias is None  # CLIP's patch embedding has none
    assert p.state_dict()["head.proj.weight"].shape == (512, 768)


def _perturbed(name):
    """A preset with non-default weights, so a reload that silently kept the random init
    would be caught."""
    model, cfg = build_encoder(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model, cfg


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "official"])
def test_saved_state_dict_reloads_strictly_with_identical_features(tmp_path, fmt):
    model, cfg = _perturbed("kaiko_vits16")
    sd = model.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif fmt == "official":  # plain timm layout inside a training checkpoint wrapper
        torch.save({"state_dict": {"module." + k[len("trunk."):]: v for k, v in sd.items()}},
                   path)
    else:
        torch.save(sd, path)
    loaded, _, ident = load_encoder("kaiko_vits16", str(path))
    x = torch.rand(3, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
        assert not torch.allclose(loaded(x), build_encoder("kaiko_vits16")[0](x))
    assert ident.startswith("sha256:") and len(ident) == 7 + 64


def test_conch_v1_official_layout_loads_and_drops_text_tower(tmp_path):
    model, _ = _perturbed("conch_v1")
    sd = model.state_dict()
    official = {"visual.trunk." + k[6:]: v for k, v in sd.items() if k.startswith("trunk.")}
    official.update({"visual.attn_pool_contrast." + k[5:]: v for k, v in sd.items()
                     if k.startswith("head.") and not k.startswith("head.ln_out")})
    official.update({"visual.ln_contrast." + k[12:]: v for k, v in sd.items()
                     if k.startswith("head.ln_out.")})
    official["text.token_embedding.weight"] = torch.zeros(4, 4)
    official["visual.proj_contrast"] = torch.zeros(512, 512)
    official["logit_scale"] = torch.zeros(())
    torch.save(official, tmp_path / "conch.bin")
    loaded, _, _ = load_encoder("conch_v1", str(tmp_path / "conch.bin"))
    x = torch.rand(1, 3, 448, 448)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("layout", ["transformers 5", "hub (transformers 4)"])
def test_phikon_v2_official_layout_gives_the_hf_model_s_features(tmp_path, monkeypatch,
                                                                 layout):
    """A real transformers Dinov2Model laid out as phikon-v2's hub file: our timm model
    with the remapped weights must give its features (CLS of last_hidden_state, as Owkin's
    model card takes them). q/k/v in the wrong order, or the two layer scales swapped, load
    strictly but give other features. Both sides are narrowed to 2 layers of width 64 (the
    remap is per layer; the ViT-L shapes are checked in the tests above)."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    small = {**PRESETS["phikon_v2"].kwargs, "embed_dim": 64, "depth": 2, "num_heads": 4}
    monkeypatch.setitem(PRESETS, "phikon_v2", replace(PRESETS["phikon_v2"], kwargs=small,
                                                      dim=64))
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(image_size=224, patch_size=16, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                  layerscale_value=1e-5)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # untrained layer scales and biases would hide swaps
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if layout.startswith("hub"):
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense")):
            sd = {k.replace(new, old): v for k, v in sd.items()}
    save_file(sd, tmp_path / "model.safetensors")
    ours, _, _ = load_encoder("phikon_v2", str(tmp_path / "model.safetensors"))
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        want = hf(pixel_values=x).last_hidden_state[:, 0]
        got = ours(x)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_checkpoint_with_wrong_keys_lists_them(tmp_path):
    sd = build_encoder("kaiko_vits16")[0].state_dict()
    sd.pop("trunk.norm.weight")
    sd["trunk.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(EncoderError) as e:
        load_encoder("kaiko_vits16", str(tmp_path / "bad.pth"))
    assert "trunk.norm.weight" in str(e.value) and "trunk.extra.weight" in str(e.value)
    other = build_encoder("resnet50_trunc")[0].state_dict()
    torch.save(other, tmp_path / "resnet.pth")
    r = cli("extract", "x.svs", "--out", tmp_path / "o", "--encoder", "kaiko_vits16",
            "--weights", tmp_path / "resnet.pth")
    assert r.exit_code == 2  # x.svs does not exist: a usage error before loading
    slide = tmp_path / "s.svs"
    from .conftest import small_slide

    small_slide(slide, 512, 512)
    r = cli("extract", slide, "--out", tmp_path / "o", "--encoder", "kaiko_vits16",
            "--weights", tmp_path / "resnet.pth", "--num-workers", "0")
    assert r.exit_code == 2 and "missing keys" in r.output and "unexpected keys" in r.output


def test_unknown_encoder_lists_valid_names(tmp_path):
    r = cli("extract", "a.svs", "--out", tmp_path, "--encoder", "uni_v3")
    assert r.exit_code == 2
    assert "uni_v3" in r.output and "uni_v1" in r.output and "gigapath" in r.output


def test_weights_folder_then_hub_then_a_clear_error(tmp_path, monkeypatch):
    model, _ = _perturbed("kaiko_vits16")
    (tmp_path / "kaiko_vits16").mkdir()
    torch.save(model.state_dict(), tmp_path / "kaiko_vits16" / "model.pth")
    res = resolve_weights("kaiko_vits16", None, {"WSI_EMBED_WEIGHTS": str(tmp_path)})
    assert res.path == tmp_path / "kaiko_vits16" / "model.pth"

    import huggingface_hub

    def offline(repo, filename, **kw):  # no hub here: mock only the download
        raise OSError(f"cannot reach the hub for {repo}/{filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(EncoderError) as e:
        resolve_weights("uni_v1", None, {})
    msg = str(e.value)
    for part in ("MahmoodLab/UNI", "gated", "HF_TOKEN", "--weights", "WSI_EMBED_WEIGHTS",
                 "pytorch_model.bin"):
        assert part in msg

    def fake_download(repo, filename, **kw):
        p = tmp_path / "hub" / filename
        p.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), p)
        return str(p)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    res = resolve_weights("kaiko_vits16", None, {})
    assert res.source.startswith("hf:1aurent/") and res.ident.startswith("sha256:")


def test_encoders_command_lists_the_registry(tmp_path):
    r = cli("encoders")
    assert r.exit_code == 0
    for name in REQUIRED:
        assert name in r.output
    assert "CC-BY-NC-ND-4.0" in r.output and "GPL-3.0" in r.output
    import json

    rows = {row["name"]: row for row in json.loads(cli("encoders", "--json").output)}
    assert set(rows) == set(PRESETS)
    for name, cfg in PRESETS.items():  # every fact a pipeline needs, as the preset has it
        row = rows[name]
        assert (row["dim"], row["input_size"], row["resize"], row["interpolation"],
                row["target_mpp"], row["precision"]) == (
            cfg.dim, cfg.input_size, cfg.resize, cfg.interpolation, cfg.target_mpp,
            cfg.precision)
        assert (tuple(row["mean"]), tuple(row["std"])) == tuple(map(tuple, cfg.mean_std))
    assert rows["ctranspath"]["target_mpp"] == 1.0
    assert rows["virchow2"]["output"] == "CLS ⊕ mean of patch tokens"
    # a run at another resolution than the preset's says so, naming both
    from .conftest import small_slide

    slide = small_slide(tmp_path / "s.svs", 512, 512)
    r = cli("extract", slide, "--out", tmp_path / "o", "--encoder", "ctranspath", "--weights",
            "random", "--num-workers", "0", "--tissue", "none")
    assert r.exit_code == 0 and "ctranspath was trained on patches at 1 µm/px" in r.output
    assert "this run tiles at 0.5 µm/px" in r.output


def test_ctranspath_official_layout_loads(tmp_path):
    """TransPath's `ctranspath.pth` as released (ENCODERS.md §3.4): timm 0.5.4 Swin keys
    under `model`, with the `relative_position_index` and `attn_mask` buffers, each stage's
    PatchMerging at the end of the stage before, no head."""
    model, _ = _perturbed("ctranspath")
    official = {}
    for k, v in model.state_dict().items():
        k = k[len("trunk."):]
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        official[".".join(parts)] = v
    for i, depth in enumerate((2, 2, 6, 2)):
        for j in range(depth):
            official[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(
                49, 49, dtype=torch.int64)
            if j % 2:
                official[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    assert "layers.0.downsample.reduction.weight" in official
    assert "layers.3.downsample.reduction.weight" not in official
    torch.save({"model": official}, tmp_path / "ctranspath.pth")
    loaded, _, _ = load_encoder("ctranspath", str(tmp_path / "ctranspath.pth"))
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_resnet50_trunc_official_layout_loads_and_is_cut_after_layer3(tmp_path):
    """A whole ImageNet ResNet-50 (timm/torchvision names, with layer4 and fc): the preset
    keeps layers up to layer3 and averages them, as CLAM's baseline does."""
    import timm

    torch.manual_seed(3)
    full = timm.create_model("resnet50", pretrained=False).eval()
    torch.save(full.state_dict(), tmp_path / "resnet50.pth")
    loaded, _, _ = load_encoder("resnet50_trunc", str(tmp_path / "resnet50.pth"))
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        want = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))
        assert torch.allclose(loaded(x), want, atol=1e-5)


@pytest.mark.parametrize("layout", ["transformers 5", "hub (transformers 4)"])
def test_phikon_official_layout_gives_the_hf_model_s_features(tmp_path, monkeypatch, layout):
    """Phikon (v1) is a transformers ViTModel (ENCODERS.md §3.1, §4.10): our timm model with
    the remapped weights must give its CLS of last_hidden_state, from the hub file's names
    (transformers 4: `encoder.layer.N.attention.attention.query`, `intermediate.dense`, ...)
    or transformers 5's, with the pooler (dropped) and under a `vit.` prefix. Both narrowed
    to 2 layers of width 64; eps 1e-6 as in the hub config since its PR #1."""
    from transformers import ViTConfig, ViTModel

    small = {**PRESETS["phikon"].kwargs, "embed_dim": 64, "depth": 2, "num_heads": 4}
    monkeypatch.setitem(PRESETS, "phikon", replace(PRESETS["phikon"], kwargs=small, dim=64))
    torch.manual_seed(0)
    hf = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=64,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                            layer_norm_eps=1e-6, qkv_bias=True), add_pooling_layer=True).eval()
    with torch.no_grad():
        for p in hf.parameters():  # untrained biases and norms would hide swapped names
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("pooler.") for k in sd)
    if layout.startswith("hub") and any(k.startswith("layers.") for k in sd):
        names = (("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
                 ("attention.k_proj", "attention.attention.key"),
                 ("attention.v_proj", "attention.attention.value"),
                 ("attention.o_proj", "attention.output.dense"),
                 ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
        for new, old in names:
            sd = {k.replace(new, old, 1): v for k, v in sd.items()}
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        want = hf(pixel_values=x).last_hidden_state[:, 0]
    for name, weights in (("hub.bin", sd), ("prefixed.bin", {"vit." + k: v
                                                            for k, v in sd.items()})):
        torch.save(weights, tmp_path / name)
        ours, _, _ = load_encoder("phikon", str(tmp_path / name))
        with torch.inference_mode():
            got = ours(x)
        assert (got - want).abs().max() < 1e-4 * want.abs().max(), name


@pytest.mark.parametrize("layout", ["transformers 5", "hub (transformers 4)"])
def test_midnight_official_layout_gives_the_card_s_embedding(tmp_path, monkeypatch, layout):
    """Midnight-12k is a transformers Dinov2Model with SwiGLU (ENCODERS.md §3.2, §4.14); its
    card's embedding is cat(CLS, mean of patch tokens) of last_hidden_state. A real Dinov2Model
    narrowed to 2 layers of width 64 (SwiGLU hidden 176, as Dinov2 rounds it; timm's packed
    ratio 5.5) against our preset with the same narrowing."""
    from transformers import Dinov2Config, Dinov2Model

    small = {**PRESETS["midnight"].kwargs, "embed_dim": 64, "depth": 2, "num_heads": 4,
             "mlp_ratio": 5.5}
    monkeypatch.setitem(PRESETS, "midnight", replace(PRESETS["midnight"], kwargs=small,
                                                     dim=128))
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(image_size=224, patch_size=14, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                  use_swiglu_ffn=True, layerscale_value=1e-5)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if layout.startswith("hub") and any(".mlp.gate_proj." in k for k in sd):
        for k in [k for k in sd if ".mlp.gate_proj." in k]:  # 4.x packs gate and up
            block, kind = k.split(".mlp.gate_proj.")
            sd[f"{block}.mlp.weights_in.{kind}"] = torch.cat(
                [sd.pop(k), sd.pop(f"{block}.mlp.up_proj.{kind}")])
            sd[f"{block}.mlp.weights_out.{kind}"] = sd.pop(f"{block}.mlp.down_proj.{kind}")
        assert not any("_proj" in k and ".mlp." in k for k in sd)
    save_file(sd, tmp_path / "model.safetensors")
    ours, cfg, _ = load_encoder("midnight", str(tmp_path / "model.safetensors"))
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        h = hf(pixel_values=x).last_hidden_state
        want = torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1)
        got = ours(x)
    assert got.shape == (2, 128) and cfg.mean_std == ((0.5,) * 3, (0.5,) * 3)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
