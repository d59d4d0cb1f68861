"""Named random streams (runtime.seeds): the registry is the only place a `seed + k` offset lives."""

from collections import defaultdict

import pytest
import torch

from dmvae_lib.runtime.seeds import OFFSETS, stream, stream_seed


def test_unknown_stream_raises_naming_it():
    with pytest.raises(KeyError, match="tokenizer.nope"):
        stream_seed(0, "tokenizer.nope")
    with pytest.raises(KeyError):
        stream(0, "batches")  # a name needs its prefix


def test_offsets_are_distinct_within_each_prefix():
    by_prefix = defaultdict(list)
    for name, offset in OFFSETS.items():
        by_prefix[name.split(".")[0]].append(offset)
    for prefix, offsets in by_prefix.items():
        assert len(set(offsets)) == len(offsets), f"{prefix}.* streams share an offset: {offsets}"


def test_offsets_are_the_workbook_s_historical_ones():
    # changing one changes every run's numbers: a new stream takes a new name instead (added below)
    historical = {
        "toy.sw2": 1, "toy.noise_floor": 2, "toy.init_points": 3, "toy.align": 4, "toy.sample_noise": 5,
        "toy.reference_eval": 10_000, "data.shapes_val": 7919, "ssl.batches": 1, "tokenizer.supervised": 1,
        "tokenizer.init": 5, "tokenizer.disc_init": 6, "tokenizer.batches": 11, "tokenizer.align_init": 7,
        "velocity.batches": 23,
        "velocity.noise": 29, "teacher.eval": 5, "joint.head_init": 3, "joint.batches": 29,
        "joint.fake_fm": 37, "joint.refine": 31, "generation.sde": 1, "generation.latent_fit": 5,
        "generation.trajectory": 7,
    }
    assert {k: OFFSETS[k] for k in historical} == historical
    assert set(OFFSETS) - set(historical) == {"tokenizer.random_encoder", "joint.ref_floor", "joint.gan",
                                              "joint.dm", "joint.align_init", "teacher.text_captions",
                                              "released.grid", "released.fid"}


@pytest.mark.parametrize("name", sorted(OFFSETS))
def test_stream_equals_a_generator_seeded_at_the_offset(name):
    seed = 7
    assert stream_seed(seed, name) == seed + OFFSETS[name]
    expected = torch.Generator().manual_seed(seed + OFFSETS[name])
    assert torch.equal(torch.rand(5, generator=stream(seed, name)), torch.rand(5, generator=expected))
    assert stream(seed, name).initial_seed() == seed + OFFSETS[name]
