"""FinetuneConfig: defaults, per-method learning rate, validation into CxrfairError."""

import pytest

from cxrfair.errors import CxrfairError
from cxrfair.finetune.config import DEFAULT_LR, FinetuneConfig


def test_defaults_follow_the_paper_recipe(tmp_path):
    c = FinetuneConfig(model="tiny-clip", cohort=tmp_path, out=tmp_path)
    assert (c.method, c.epochs, c.batch_size) == ("lora", 150, 64)
    assert c.lr == DEFAULT_LR["lora"]
    assert FinetuneConfig(model="m", cohort=tmp_path, out=tmp_path, method="full").lr == DEFAULT_LR["full"]
    assert c.run_id == "tiny-clip__lora__best__s0"


def test_hyperparameters_drop_lora_fields_for_full(tmp_path):
    hp = FinetuneConfig(model="m", cohort=tmp_path, out=tmp_path, method="full").hyperparameters()
    assert "lora_rank" not in hp and hp["lr"] == DEFAULT_LR["full"]
    assert "lora_rank" in FinetuneConfig(model="m", cohort=tmp_path, out=tmp_path).hyperparameters()


@pytest.mark.parametrize("bad, needle", [
    ({"epochs": 0}, "--epochs"), ({"batch_size": 0}, "--batch-size"), ({"lr": -1.0}, "--lr"),
    ({"lora_dropout": 1.0}, "--lora-dropout"), ({"method": "qlora"}, "--method"), ({"device": "tpu"}, "--device"),
])
def test_bad_values_raise_naming_the_option(tmp_path, bad, needle):
    with pytest.raises(CxrfairError, match=needle):
        FinetuneConfig(model="m", cohort=tmp_path, out=tmp_path, **bad)
