"""Pretrained weights: fetched only with DMVAE_FETCH_WEIGHTS=1 (never under HF_HUB_OFFLINE=1), into each
library's own cache, and recorded with their SHA-256 in the run's summary. The fetch functions are
monkeypatched: nothing here touches the network."""

import hashlib
import json

import pytest
import timm
import torch

from dmvae_lib.metrics import evaluation, image_metrics
from dmvae_lib.models import recon_losses
from dmvae_lib.models.tokenizer import timm_encoder
from dmvae_lib.runtime import weights
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.viz.figures import FigureStore
from dmvae_lib.workflow.session import Session


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(weights.FETCH_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield


@pytest.fixture
def no_network(monkeypatch):
    """Fetches are recorded and served from `files` (url -> bytes, (repo, file) -> path); others fail."""
    calls, files = [], {}

    def download(url, dst, progress=True):
        calls.append(url)
        with open(dst, "wb") as f:
            f.write(files[url])

    def hf_download(repo_id, filename):
        calls.append((repo_id, filename))
        if (repo_id, filename) not in files:
            raise FileNotFoundError(filename)
        return str(files[repo_id, filename])

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(weights, "hf_hub_download", hf_download)
    monkeypatch.setattr(weights, "try_to_load_from_cache", lambda repo_id, filename: None)  # empty cache
    return calls, files


def test_fetching_is_opt_in_and_hf_hub_offline_wins(monkeypatch):
    assert not weights.fetch_allowed()
    monkeypatch.setenv(weights.FETCH_ENV, "1")
    assert weights.fetch_allowed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not weights.fetch_allowed()


def test_ensure_file_fetches_only_when_allowed(tmp_path, monkeypatch, no_network):
    calls, files = no_network
    files["https://x/w.pth"] = b"weights"
    target = tmp_path / "hub" / "checkpoints" / "w.pth"
    assert weights.ensure_file(target, "https://x/w.pth", "w") is None and calls == []
    monkeypatch.setenv(weights.FETCH_ENV, "1")
    assert weights.ensure_file(target, "https://x/w.pth", "w") == target and target.read_bytes() == b"weights"
    assert weights.ensure_file(target, "https://x/w.pth", "w") == target and len(calls) == 1  # cached now
    rec = weights.record("w", target)
    digest = hashlib.sha256(b"weights").hexdigest()
    assert rec == {"w": {"path": str(target), "sha256": digest, "fetched": True}}


@pytest.mark.filterwarnings("ignore:no Chrome")
def test_the_run_summary_records_the_weights_with_their_sha256(tmp_path):
    """From the models given and from the stats in the summary (nested); nothing from a process ledger."""
    files = {n: tmp_path / n for n in ("enc.safetensors", "vgg.pth", "unrelated.pth")}
    for n, f in files.items():
        f.write_bytes(n.encode())
    enc = torch.nn.Sequential(torch.nn.Linear(2, 2))
    enc[0].weights_files = weights.record("timm:fake", files["enc.safetensors"])
    weights.record("never_used", files["unrelated.pth"])  # a record nobody keeps is in no summary
    stats = {"lpips": 0.1, **weights.provenance(torch.nn.Identity(), None, {"a": [1]})}
    assert stats == {"lpips": 0.1}  # nothing read: no key
    lp = torch.nn.Identity()
    lp.weights_files = weights.record("lpips_vgg16", files["vgg.pth"])
    run = RunDir.create(tmp_path / "runs", "20", "r", {"stage": "tokenizer"})
    session = Session(None, run, torch.device("cpu"), FigureStore(run.figures, png=False), "cpu")
    session.finish({"x": 1.0, "eval": [{"lpips": 0.1, **weights.provenance(lp)}]}, models=[enc])
    summary = json.loads((run.path / "summary.json").read_text())
    sha = {n: hashlib.sha256(n.encode()).hexdigest() for n in files}
    assert summary["weights"] == {
        "lpips_vgg16": {"path": str(files["vgg.pth"]), "fetched": False, "sha256": sha["vgg.pth"]},
        "timm:fake": {"path": str(files["enc.safetensors"]), "fetched": False,
                      "sha256": sha["enc.safetensors"]}}
    session.finish({"x": 1.0})
    assert "weights" not in json.loads((run.path / "summary.json").read_text())
    reference = type("Reference", (), {})()  # not a module: a `text` reference carrying its tower's record
    reference.weights_files = weights.record("text:tower", files["unrelated.pth"])
    session.finish({"x": 1.0}, models=[enc, reference])
    assert set(json.loads((run.path / "summary.json").read_text())["weights"]) == {"timm:fake", "text:tower"}


def test_timm_encoder_fetches_into_the_hf_cache_only_when_asked(tmp_path, monkeypatch, no_network):
    calls, files = no_network
    name = "vit_tiny_patch16_224"
    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    src = timm.create_model(name, img_size=32, num_classes=0)
    path = tmp_path / "hf" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(src.state_dict(), path)
    files[hub_id, "pytorch_model.bin"] = path  # the hub has no safetensors file: the .bin is next
    with pytest.raises(RuntimeError, match=weights.FETCH_ENV):
        timm_encoder(name, img_size=32)
    assert calls == []
    monkeypatch.setenv(weights.FETCH_ENV, "1")
    enc = timm_encoder(name, img_size=32)
    assert calls == [(hub_id, "model.safetensors"), (hub_id, "pytorch_model.bin")]
    assert torch.equal(enc.features.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert weights.files_of(enc)[f"timm:{name}"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_lpips_fetches_vgg16_into_torchvisions_cache_only_when_asked(tmp_path, monkeypatch, no_network):
    calls, files = no_network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    files[recon_losses.VGG16_URL] = b"vgg16"
    loaded = []
    monkeypatch.setattr(recon_losses.PerceptualLoss, "_load_backbone", lambda self, path: loaded.append(path))
    assert recon_losses.perceptual_loss("auto") is None and calls == []
    monkeypatch.setenv(weights.FETCH_ENV, "1")
    net = recon_losses.perceptual_loss("auto")
    target = tmp_path / "hub" / "checkpoints" / recon_losses.VGG16_FILE
    assert net.is_real_lpips and loaded == [target] and calls == [recon_losses.VGG16_URL]
    assert weights.files_of(net)["lpips_vgg16"] == {"path": str(target), "fetched": True,
                                                    "sha256": hashlib.sha256(b"vgg16").hexdigest()}


def test_inception_is_fetched_only_when_asked(tmp_path, monkeypatch, no_network):
    calls, files = no_network
    files[image_metrics.INCEPTION_URL] = b"inception"
    target = tmp_path / image_metrics.INCEPTION_FILE
    samples = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    res = evaluation.inception_metrics(samples, weights_path=target)
    assert res["available"] is False and weights.FETCH_ENV in res["reason"] and calls == []
    with pytest.raises(RuntimeError, match=weights.FETCH_ENV):
        image_metrics.load_inception(target)
    monkeypatch.setenv(weights.FETCH_ENV, "1")
    assert image_metrics._check_inception_file(target, "test") == target
    assert target.read_bytes() == b"inception"
    assert calls == [image_metrics.INCEPTION_URL]
