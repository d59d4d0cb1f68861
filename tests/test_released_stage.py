"""Notebook 80's library side on the tiny authors-format fixture: resumable FID parts, the user's image folder
(bad files named), the grid's shared noise, and the config's refusals. No downloads."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from dmvae_lib.configs import make_config
from dmvae_lib.configs.errors import ConfigError
from dmvae_lib.data.image_folders import DatasetError
from dmvae_lib.runtime.runs import RunDir
from dmvae_lib.stages import released as released_stage


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    cfg = make_config("released", "smoke", {"fid.n": 50, "sample.steps": 4, "sample.batch": 20})
    run = RunDir.create(tmp_path_factory.mktemp("runs"), "80_released_models", "t", {"test": True})
    return cfg, run, released_stage.load_models(cfg, run, "cpu")


def test_fid_parts_resume_to_the_same_samples(fixture_run, monkeypatch):
    cfg, run, models = fixture_run
    monkeypatch.setattr(released_stage, "PART", 20)  # parts of 20, 20, 10
    written = []
    real_save = released_stage.atomic_write_bytes
    monkeypatch.setattr(released_stage, "atomic_write_bytes",
                        lambda p, w: (written.append(p.name), real_save(p, w)))
    images, labels, npz = released_stage.fid_samples(models, cfg, run, "cpu")
    assert written == ["part_00000.npz", "part_00001.npz", "part_00002.npz"] and len(images) == 50
    assert torch.equal(labels, torch.arange(50) % 10)
    assert npz.is_file() and not (run.path / "fid_parts").exists()  # the parts go once the .npz is whole
    again = released_stage.fid_samples(models, cfg, run, "cpu")[0]
    assert torch.equal(again, images)  # read back, not redrawn
    assert len(written) == 3
    # a run killed after its first two parts: the third is made, the first two read, the same images
    npz.unlink()
    (run.path / "fid_parts").mkdir()
    for i in range(2):
        rows = slice(20 * i, 20 * i + 20)
        released_stage.np.savez(run.path / "fid_parts" / f"part_{i:05d}.npz", images=images[rows].numpy(),
                       labels=labels[rows].numpy())
    again, _, _ = released_stage.fid_samples(models, cfg, run, "cpu")
    assert written[3:] == ["part_00002.npz"] and torch.equal(images, again)


def test_grid_uses_the_same_noise_for_every_scale(fixture_run):
    cfg, _, models = fixture_run
    cfg = make_config("released", "smoke", {"grid.cfg_scales": (1.0, 3.0), "grid.per_class": 2,
                                            "sample.steps": 4, "sample.sampler": "ode"})
    a = released_stage.sample_grid(models, cfg, "cpu")
    b = released_stage.sample_grid(models, make_config("released", "smoke", {
        "grid.cfg_scales": (1.0,), "grid.per_class": 2, "sample.steps": 4, "sample.sampler": "ode"}), "cpu")
    assert torch.equal(a[1.0], b[1.0]) and not torch.equal(a[1.0], a[3.0])
    assert a[1.0].shape == (20, 64, 64, 3) and a[1.0].dtype == torch.uint8


def test_image_folder_names_a_corrupt_file_or_serves_a_neighbour(tmp_path):
    folder = released_stage.write_fixture_images(tmp_path / "imgs", 30, seed=0)
    first = sorted(d for d in folder.iterdir() if d.is_dir())[0]
    broken = sorted(first.glob("*.png"))[-1]  # its neighbour is the next class's first image
    broken.write_bytes(b"not a png")
    c = make_config("released", "smoke").images
    with pytest.raises(DatasetError, match=broken.name):
        released_stage.read_images(folder, 64, c, seed=0)
    c = make_config("released", "smoke", {"images.skip_corrupt": True}).images
    images, labels, classes, paths = released_stage.read_images(folder, 64, c, seed=0)
    assert images.shape == (30, 64, 64, 3) and len(labels) == 30 and "circle" in classes
    assert str(broken) not in paths  # the image served in its place is recorded, with its own label
    assert [Path(p).parent.name for p in paths] == [classes[k] for k in labels]


def test_image_folder_subset_is_class_balanced_and_seeded(tmp_path):
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(folder / c / f"{i}.png")
    c = make_config("released", "smoke", {"images.n": 10}).images
    images, labels, classes, paths = released_stage.read_images(folder, 16, c, seed=3)
    assert images.shape == (10, 16, 16, 3) and labels.bincount().tolist() == [5, 5] and classes == ["a", "b"]
    same, other = (released_stage.read_images(folder, 16, c, seed=k)[3] for k in (3, 4))
    assert paths == same != other
    with pytest.raises(DatasetError, match="no class sub-folders"):
        released_stage.read_images(folder / "a", 16, c, seed=0)
    only_b = make_config("released", "smoke", {"images.n": 4, "images.classes": (1,)}).images
    _, labels, _, paths = released_stage.read_images(folder, 16, only_b, seed=0)
    assert labels.tolist() == [1] * 4 and all("/b/" in p for p in paths)
    with pytest.raises(DatasetError, match=r"images.classes \[2\]: .* has only 2 class folders"):
        three = make_config("released", "smoke", {"images.classes": (2,)}).images
        released_stage.read_images(folder, 16, three, 0)


@pytest.mark.parametrize("overrides, words", [
    ({"files.tokenizer": "/x/vae.pt"}, "files.fixture writes its own files"),
    ({"files.fixture": False, "files.generator_name": "ep100.pt"}, "ep64.pt, ep400.pt, ep800.pt"),
    ({"grid.classes": (10,)}, "class ids in 0..9"),
    ({"files.weights": "best"}, "files.weights 'best' unknown"),
])
def test_config_refusals_name_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words):
        make_config("released", "smoke", overrides)


def test_missing_released_files_say_where_to_put_them(tmp_path):
    cfg = make_config("released", "imagenet256", {"files.tokenizer": str(tmp_path / "vae.pt")})
    run = RunDir.create(tmp_path / "runs", "80_released_models", "t", {"test": True})
    with pytest.raises(Exception, match=r"no file .*vae\.pt \(the authors' vae\.pt\).*huggingface"):
        released_stage.load_models(cfg, run, "cpu")
