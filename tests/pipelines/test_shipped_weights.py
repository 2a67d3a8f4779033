"""The weights shipped in ``pipelines/weights``: each loads strictly into the model its metadata
names, has a model card, and stays within the 20 MB a shipped file may take."""

import pytest

from kscan.errors import ConfigError
from kscan.pipelines import checkpoint

SHIPPED = sorted(checkpoint.WEIGHTS_DIR.glob("*.safetensors"))


def test_the_shipped_models_are_there():
    names = {p.stem for p in SHIPPED}
    for name in ("rvn", "varnet", "vmunet", "mhs-vm", "idslr", "segnet"):
        assert name in names
    assert {"joint-rvn-vmunet", "sequential-rvn-vmunet", "joint-rvn-mhsvm"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_weights_load_and_have_a_model_card(path):
    assert path.stat().st_size <= 20 * 10**6
    model, ckpt = checkpoint.load_model(path)
    n_params = sum(p.numel() for p in model.parameters())
    card = path.with_suffix(".md").read_text()
    assert card.startswith(f"# Model card: `{path.name}`")
    assert f"{n_params:,}" in card, f"{path.name}: the card does not give {n_params:,} parameters"
    assert ckpt.model in card


def test_checkpoint_references():
    weights = checkpoint.WEIGHTS_DIR
    assert checkpoint.resolve_checkpoint(None, "rvn") == weights / "rvn.safetensors"
    assert checkpoint.resolve_checkpoint("shipped", "vmunet") == weights / "vmunet.safetensors"
    assert (
        checkpoint.resolve_checkpoint("shipped:rvn-scaled", "rvn")
        == weights / "rvn-scaled.safetensors"
    )
    assert checkpoint.resolve_checkpoint("runs/x.safetensors", "rvn").name == "x.safetensors"
    for bad in ("shipped:nope", "shipped:", "shipped:../weights/rvn"):
        with pytest.raises(ConfigError, match="no such shipped file.*rvn-scaled"):
            checkpoint.resolve_checkpoint(bad, "rvn")
    with pytest.raises(ConfigError, match="no weights are shipped for model 'joint-rvn-seg'"):
        checkpoint.resolve_checkpoint("shipped", "joint-rvn-seg")
