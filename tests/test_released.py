"""The authors' released weights: the converters reproduce *their* modules' outputs (a committed fixture made
with their code, tests/fixtures/released/README.md), name every bad key, and the file reader names bad files.
No downloads, no authors' code."""

import argparse
import json
from pathlib import Path

import pytest
import safetensors
import timm
import torch

from dmvae_lib.configs import from_dict, make_config, to_dict
from dmvae_lib.configs.generation import GenerationStageConfig
from dmvae_lib.configs.teacher import TeacherStageConfig
from dmvae_lib.models.lightning_dit import LightningDiT, sincos_pos_embed_2d
from dmvae_lib.models.released import (
    AUTHORS_DIT_SETTINGS,
    ConversionError,
    dit_state_from_authors,
    tokenizer_state_from_authors,
)
from dmvae_lib.models.tokenizer import Decoder, FrozenEncoder, Projector, TimmFeatures, Tokenizer
from dmvae_lib.runtime import weights
from dmvae_lib.runtime.runs import RunError
from dmvae_lib.train import released
from dmvae_lib.train.artifacts import build_net

FIXTURE = Path(__file__).parent / "fixtures" / "released" / "authors_tiny.safetensors"
RTOL = 1e-4  # max |ours − theirs| / max |theirs| (fp32 on the CPU; measured ≈ 1e-6)


def _fixture() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(FIXTURE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _our_dit(args: dict, **settings) -> LightningDiT:
    net = LightningDiT(args["input_size"], args["in_channels"], args["hidden_size"], args["depth"],
                       args["num_heads"], args["num_classes"], patch_size=args["patch_size"], **settings)
    return net.eval()


def _our_tokenizer(a: dict) -> Tokenizer:
    """Ours at the fixture's tiny sizes (timm_encoder builds only named models, so the ViT is built here)."""
    vit = timm.create_model(a["timm_name"], pretrained=False, num_classes=0, img_size=a["image_size"],
                            patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=a["depth"],
                            num_heads=a["num_heads"])
    stage = vit.prune_intermediate_layers([-1], prune_norm=False, prune_head=True)[0]
    encoder = FrozenEncoder(TimmFeatures(vit, stage), a["embed_dim"], a["patch_size"])
    latent = a["image_size"] // a["patch_size"]
    decoder = Decoder(a["z_channels"], latent_size=latent, image_size=a["image_size"], ch=a["dec_ch"],
                      ch_mult=tuple(a["dec_mult"]), num_res_blocks=a["dec_res_blocks"], attn=True,
                      num_groups=32)
    return Tokenizer(encoder, Projector(a["embed_dim"], a["z_channels"], hidden_channels=a["mlp_hidden"]),
                     decoder).eval()


def test_fixture_is_small_and_says_where_it_came_from():
    tensors, meta = _fixture()
    assert FIXTURE.stat().st_size < 1_000_000
    assert meta["authors_commit"].startswith("d2be8e0") and "dit_args" in meta and "tokenizer_args" in meta


def test_converted_dit_reproduces_the_authors_velocity():
    tensors, meta = _fixture()
    args, inp = json.loads(meta["dit_args"]), _part(tensors, "dit_input.")
    net = _our_dit(args, **AUTHORS_DIT_SETTINGS)
    net.load_state_dict(dit_state_from_authors(_part(tensors, "dit."), net.state_dict()), strict=True)
    with torch.no_grad():
        v = net(inp["x"].float(), inp["t"], inp["y"])
    assert _close(v, tensors["dit_output.v"]) < RTOL
    # the settings matter: our defaults (1000·t, row/column table) with the same weights are far off
    default = _our_dit(args)
    default.load_state_dict(dit_state_from_authors(_part(tensors, "dit."), default.state_dict()))
    with torch.no_grad():
        assert _close(default(inp["x"].float(), inp["t"], inp["y"]), tensors["dit_output.v"]) > 1e-2


def test_converted_tokenizer_reproduces_the_authors_latents_and_reconstruction():
    tensors, meta = _fixture()
    args = json.loads(meta["tokenizer_args"])
    tok = _our_tokenizer(args)
    state = tokenizer_state_from_authors(_part(tensors, "vae."), tok.state_dict(), latent_mean=0.0685,
                                         latent_scale=0.1763)
    tok.load_state_dict(state, strict=True)
    image, tokens = tensors["vae_input.image"].float(), tensors["vae_output.tokens"]
    with torch.no_grad():
        reconstruction, z = tok(image)
    side = args["image_size"] // args["patch_size"]
    assert _close(z, tokens.transpose(1, 2).reshape(z.shape[0], -1, side, side)) < RTOL  # tokens row-major
    assert _close(reconstruction, tensors["vae_output.reconstruction"]) < RTOL
    assert (tok.latent_mean.item(), tok.latent_scale.item()) == pytest.approx((0.0685, 0.1763))


def _dit_case(change: str):
    tensors, meta = _fixture()
    sd, net = _part(tensors, "dit."), _our_dit(json.loads(meta["dit_args"]), **AUTHORS_DIT_SETTINGS)
    if change == "missing":
        del sd["blocks.1.mlp.w3.bias"]
    elif change == "unexpected":
        sd["blocks.2.norm1.weight"] = sd["blocks.1.norm1.weight"]  # a block our net does not have
    elif change == "unmapped":
        sd["blocks.0.attn.rel_bias"] = torch.zeros(3)
    elif change == "mis-shaped":
        sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:-1]
    elif change == "table":  # a position table in our (row, column) order, not theirs
        sd["pos_embed"] = sincos_pos_embed_2d(sd["pos_embed"].shape[-1], 4, "row_col")[None]
    return sd, net.state_dict()


@pytest.mark.parametrize("change, words", [
    ("missing", ["missing keys", "blocks.1.mlp.w3.bias"]),
    ("unexpected", ["unexpected keys", "blocks.2.norm1.weight"]),
    ("unmapped", ["unmapped keys", "blocks.0.attn.rel_bias"]),
    ("mis-shaped", ["mis-shaped", "blocks.0.attn.qkv.weight (95, 32) (ours (96, 32))"]),
    ("table", ["fixed tables unlike ours", "pos_embed"]),
])
def test_dit_conversion_errors_name_the_key(change, words):
    sd, like = _dit_case(change)
    with pytest.raises(ConversionError) as err:
        dit_state_from_authors(sd, like)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_every_problem_is_named_in_one_message():
    tensors, meta = _fixture()
    sd = _part(tensors, "vae.")
    del sd["decoder.mid.attn_1.k.weight"]
    sd["bottle_neck.mlp.2.weight"] = sd["bottle_neck.mlp.2.weight"][:, :-1]
    sd["encoder.model.mask_token"] = torch.zeros(1, 32)
    tok = _our_tokenizer(json.loads(meta["tokenizer_args"]))
    with pytest.raises(ConversionError) as err:
        tokenizer_state_from_authors(sd, tok.state_dict(), latent_mean=0.0, latent_scale=1.0)
    msg = str(err.value)
    for words in ("decoder.mid.1.qkv.weight (from q, k, v; only decoder.mid.attn_1.q.weight, "
                  "decoder.mid.attn_1.v.weight)", "encoder.model.mask_token",
                  "bottle_neck.mlp.2.weight → projector.net.2.weight (8, 63, 1, 1) (ours (8, 64, 1, 1))"):
        assert words in msg, msg


def _authors_file(path: Path, **entries) -> Path:
    torch.save(entries, path)
    return path


def test_read_released_picks_the_entry(tmp_path):
    tensors, _ = _fixture()
    ema = _part(tensors, "dit.")
    raw = {k: v + 1 for k, v in ema.items()}
    file = _authors_file(tmp_path / "ep800.pt", ema=ema, model=raw, args={"lr": 2e-4})
    assert torch.equal(released.read_released(file, "model")["t_embedder.mlp.0.bias"],
                       raw["t_embedder.mlp.0.bias"])
    assert torch.equal(released.read_released(file, "ema")["pos_embed"], ema["pos_embed"])
    with pytest.raises(RunError, match=r"ep800\.pt has no entry 'vae_ema' \(it holds \['args', 'ema'"):
        released.read_released(file, "vae_ema")


def test_read_released_names_a_truncated_missing_or_pickled_file(tmp_path):
    tensors, _ = _fixture()
    file = _authors_file(tmp_path / "vae.pt", vae_ema=_part(tensors, "vae."))
    data = file.read_bytes()
    truncated = tmp_path / "truncated_vae.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="truncated_vae.pt is unreadable"):
        released.read_released(truncated, "vae_ema")
    with pytest.raises(RunError, match="no file .*absent.pt"):
        released.read_released(tmp_path / "absent.pt", "vae_ema")
    pickled = _authors_file(tmp_path / "pickled.pt", ema=_part(tensors, "dit."), args=argparse.Namespace(a=1))
    with pytest.raises(RunError, match="pickled.pt holds Python objects.*trust_pickle=True"):
        released.read_released(pickled, "ema")
    assert "pos_embed" in released.read_released(pickled, "ema", trust_pickle=True)


def test_released_file_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "try_to_load_from_cache", lambda *a, **k: None)  # an empty HF cache
    monkeypatch.delenv("DMVAE_FETCH_WEIGHTS", raising=False)
    with pytest.raises(RunError, match="ep400.pt is not in the Hugging Face cache.*DMVAE_FETCH_WEIGHTS=1"):
        released.released_file("ep400.pt")
    with pytest.raises(RunError, match=r"no file .*mine\.pt \(the authors' vae\.pt\)"):
        released.released_file("vae.pt", tmp_path / "mine.pt")
    with pytest.raises(ValueError, match="unknown released file 'ep100.pt'"):
        released.released_file("ep100.pt")
    mine = _authors_file(tmp_path / "mine.pt", vae_ema={})
    assert released.released_file("vae.pt", mine) == mine


def test_released_arch_defaults_are_the_authors_files():
    cfg = make_config("released", "imagenet256")
    t, g = cfg.tokenizer, cfg.generator
    assert (t.timm_name, t.image_size, t.patch_size, t.z_channels, t.mlp_hidden) == \
        ("vit_large_patch14_dinov2.lvd142m", 256, 16, 32, 2048)
    assert (t.dec_ch, t.dec_mult, t.dec_res_blocks, t.latent_mean, t.latent_scale) == \
        (128, (1, 2, 4, 4), 2, 0.0685, 0.1763)
    assert (g.depth, g.hidden, g.heads, g.patch_size, g.num_classes) == (28, 1152, 16, 1, 1000)
    assert released.latent_shape(t) == (32, 16, 16)
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.files.generator_name) == ("sde", 250, "ep800.pt")


def test_fixture_files_load_through_the_loaders_and_reproduce_the_authors(tmp_path):
    """What notebook 80 runs at smoke: the fixture written as their files, read by the same loaders as the
    released files, then the same outputs as their modules."""
    cfg = make_config("released", "smoke")
    vae, dit = released.write_fixture_files(tmp_path)
    tensors, _ = _fixture()
    tok, info = released.load_released_tokenizer(vae, arch=cfg.tokenizer)
    shape = released.latent_shape(cfg.tokenizer)
    net, ginfo = released.load_released_generator(dit, file=dit.name, arch=cfg.generator, latents=shape,
                                                  weights_name="raw")
    inp = _part(tensors, "dit_input.")
    with torch.no_grad():
        v = net(inp["x"].float(), inp["t"], inp["y"])
        reconstruction, z = tok(tensors["vae_input.image"].float())
    assert _close(v, tensors["dit_output.v"]) < RTOL
    assert _close(reconstruction, tensors["vae_output.reconstruction"]) < RTOL
    assert z.shape[1:] == shape and tuple(inp["x"].shape[1:]) == shape  # the pair works together
    assert info["entry"] == "vae_ema" and ginfo["entry"] == "model" and len(info["sha256"]) == 64
    assert tok.weights_files[f"released:{vae.name}"]["sha256"] == info["sha256"]
    assert not any(p.requires_grad for p in net.parameters())


def test_a_wrong_file_for_the_architecture_names_the_keys(tmp_path):
    cfg = make_config("released", "smoke", {"generator.depth": 3})
    _, dit = released.write_fixture_files(tmp_path)
    with pytest.raises(RunError, match=r"ep_tiny\.pt \[ema\].*missing keys \(\d+\): blocks\.2\."):
        released.load_released_generator(dit, file=dit.name, arch=cfg.generator,
                                         latents=released.latent_shape(cfg.tokenizer))


def test_dit_settings_reach_the_net_and_old_configs_keep_our_defaults():
    cfg = make_config("teacher", "smoke", {"net.time_scale": 1.0, "net.pos_embed_order": "col_row"})
    net = build_net(cfg, (4, 8, 8), 3)
    assert net.time_scale == 1.0 and net.pos_embed_order == "col_row"
    old = to_dict(make_config("generation", "smoke"))
    for key in ("time_scale", "pos_embed_order"):  # a config saved before these keys existed
        del old["net"][key]
    for cls in (GenerationStageConfig, TeacherStageConfig):
        net = build_net(from_dict(cls, {"net": old["net"]}), (4, 8, 8), 3)
        assert net.time_scale == 1000.0 and net.pos_embed_order == "row_col"


def test_position_table_orders():
    ours, theirs = sincos_pos_embed_2d(16, 3, "row_col"), sincos_pos_embed_2d(16, 3, "col_row")
    assert torch.equal(theirs, torch.cat([ours[:, 8:], ours[:, :8]], dim=1))
    assert torch.equal(ours[1, :8], ours[2, :8]) and not torch.equal(theirs[1, :8], theirs[2, :8])  # row 0
    with pytest.raises(ValueError, match="pos_embed_order 'xy' unknown"):
        sincos_pos_embed_2d(16, 3, "xy")
