"""The GPU-only paths, exercised here on the CPU for wiring, shape and dtype: fused AdamW, torch.compile and
channels_last of the tokenizer's decoder, bf16 autocast in the tokenizer step, the SDPA flash path of the
velocity nets, and the pinned, persistent DataLoader of an ImageFolder. None of this runs on the `cpu`
preset's default path, whose numbers these switches leave alone."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmvae_lib.configs import make_config
from dmvae_lib.data import images as images_mod
from dmvae_lib.data.images import ImageData, batches, load_data
from dmvae_lib.models.lightning_dit import DIT_SIZES, lightning_dit
from dmvae_lib.runtime import device as device_mod
from dmvae_lib.stages import tokenizer as tokenizer_stage
from dmvae_lib.train.artifacts import build_tokenizer

TINY = {"data.n_train": 64, "data.n_val": 32, "encoder.kind": "random", "encoder.ssl.width": 8,
        "net.proj_hidden": 16, "net.dec_ch": 8, "net.dec_groups": 4, "train.steps": 2, "train.batch": 8,
        "train.disc_start": 1, "train.disc_ndf": 8, "train.log_every": 1, "train.ckpt_every": 0,
        "train.lpips": "off", "train.align_global": 0.0, "train.align_token": 0.0}


def test_fused_adamw_only_on_cuda():
    assert device_mod.fused_adamw("cpu") is None  # torch's default: the CPU update is unchanged
    assert device_mod.fused_adamw(torch.device("cuda", 0)) is True


def test_compile_in_place_calls_torch_compile_and_keeps_the_state_dict(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: calls.append(fn) or fn)
    net = torch.nn.Linear(2, 2)
    keys = list(net.state_dict())
    assert device_mod.compile_in_place(net, False) is net and calls == []
    device_mod.compile_in_place(net, True)
    assert len(calls) == 1 and list(net.state_dict()) == keys
    assert net(torch.zeros(1, 2)).shape == (1, 2)


def test_tokenizer_stage_wires_fused_adamw_compile_channels_last_and_bf16(tmp_path, monkeypatch):
    """train.compile / train.channels_last / precision bf16 and a CUDA device's fused AdamW, on this CPU:
    the decoder goes through torch.compile, its convolutions and the discriminator's are NHWC, it computes
    in bf16 under autocast and the step still hands the losses fp32 reconstructions."""
    cfg = make_config("tokenizer", "smoke", {**TINY, "train.compile": True, "train.channels_last": True,
                                             "train.precision": "bf16"})
    data = load_data(cfg, tmp_path / "cache")
    tok = build_tokenizer(cfg, tokenizer_stage.random_encoder(cfg, data, "cpu", calibration_batches=1,
                                                              batch=32))
    compiled, fused, out_dtypes, out_formats = [], [], [], []
    monkeypatch.setenv("DMVAE_CPU_BF16", "1")  # bf16 autocast on this CPU (emulated; the tiny net is cheap)
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)
    monkeypatch.setattr(tokenizer_stage, "fused_adamw", lambda device: True)  # as on CUDA

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fused.append(self.defaults["fused"])

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)

    def hook(module, args, out):
        out_dtypes.append(out.dtype)
        out_formats.append(out.is_contiguous(memory_format=torch.channels_last))

    tok.decoder.register_forward_hook(hook)
    tok, stats = tokenizer_stage.train_tokenizer(cfg, tok, data, None, "cpu", progress=False)
    assert [getattr(fn, "__self__", None) for fn in compiled] == [tok.decoder]
    assert fused == [True, True]  # tokenizer and discriminator optimizers
    assert out_dtypes and set(out_dtypes) == {torch.bfloat16} and all(out_formats)
    conv = next(m for m in tok.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert stats["nonfinite"] == 0 and all(torch.isfinite(torch.tensor(float(stats[k])))
                                           for k in ("rec_loss", "d_loss", "g_loss"))


def test_the_default_tokenizer_path_is_untouched(tmp_path, monkeypatch):
    """Without the switches: no compile, no fused optimizer, NCHW weights (the `cpu` preset's numbers)."""
    cfg = make_config("tokenizer", "smoke", {**TINY, "train.precision": "fp32", "train.steps": 1})
    data = load_data(cfg, tmp_path / "cache")
    tok = build_tokenizer(cfg, tokenizer_stage.random_encoder(cfg, data, "cpu", calibration_batches=1,
                                                              batch=32))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)
    tok, _ = tokenizer_stage.train_tokenizer(cfg, tok, data, None, "cpu", progress=False)
    conv = next(m for m in tok.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert compiled == [] and conv.weight.is_contiguous()


@pytest.mark.parametrize("size", ["tiny", "XL"])
def test_velocity_net_attention_takes_the_flash_path_under_bf16(size):
    """q, k, v reach SDPA in one dtype (bf16 under autocast) with a head dim a CUDA flash kernel takes
    (multiple of 8, ≤ 256); on the CPU, restricting SDPA to its flash backend must not fail."""
    depth, hidden, heads = DIT_SIZES[size]
    assert (hidden // heads) % 8 == 0 and hidden // heads <= 256, (size, hidden // heads)
    if size != "tiny":
        return
    torch.manual_seed(0)
    net = lightning_dit("tiny", input_size=8, in_channels=4, num_classes=3, patch_size=1)
    seen, real_sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, q.shape[-1]))
        return real_sdpa(q, k, v, *args, **kwargs)

    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention = spy
        try:
            out = net(x, t, y)
        finally:
            F.scaled_dot_product_attention = real_sdpa
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    assert seen and all(s == (torch.bfloat16, torch.bfloat16, torch.bfloat16, hidden // heads) for s in seen)


def test_imagefolder_batches_pin_memory_and_keep_workers(monkeypatch):
    seen, real_loader = [], torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("pin_memory", "persistent_workers", "num_workers")})
        return real_loader(*args, **{**kwargs, "pin_memory": False, "num_workers": 0,
                                     "persistent_workers": False})

    monkeypatch.setattr(images_mod.torch.utils.data, "DataLoader", spy)
    folder = torch.utils.data.TensorDataset(torch.zeros(8, 3, 4, 4), torch.arange(8))
    data = ImageData(None, None, torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.zeros(1), folder)
    x, y = next(batches(data, 4, torch.Generator().manual_seed(0), 2, pin_memory=True))
    assert x.shape == (4, 3, 4, 4) and y.dtype == torch.long
    next(batches(data, 4, torch.Generator().manual_seed(0), 0))
    assert seen == [{"pin_memory": True, "persistent_workers": True, "num_workers": 2},
                    {"pin_memory": False, "persistent_workers": False, "num_workers": 0}]
