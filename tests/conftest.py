import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: a second thread only adds sync stalls on a busy CPU


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
