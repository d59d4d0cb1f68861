import os

import pytest
import torch

os.environ.pop("DMVAE_FETCH_WEIGHTS", None)  # tests never download weights (runtime/weights.py)

torch.set_num_threads(1)  # tiny tensors: a second thread only adds sync stalls on a busy CPU


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
