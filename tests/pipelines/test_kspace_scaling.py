"""DIRECT's per-sample k-space scaling: the factor, the checkpoint entry, and the reconstruction
of an imported DIRECT model (scale-equivariant with it, not without it)."""

import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, FileFormatError
from kscan.models.recurrentvarnet import RecurrentVarNetConfig
from kscan.pipelines.checkpoint import load_model, read_checkpoint, save_checkpoint
from kscan.pipelines.cli import main
from kscan.pipelines.import_cmd import _percentile, import_checkpoint
from kscan.pipelines.kspace_scaling import META_KEY, KspaceScaling
from kscan.pipelines.model_inference import load_reconstructor

from .test_import_cmd import direct_layout

CONFIG = RecurrentVarNetConfig(num_steps=2, recurrent_hidden_channels=4, recurrent_num_layers=1)


def masked_kspace(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(16)
    mask[::2] = 1
    mask[6:10] = 1
    gen = torch.Generator().manual_seed(seed)
    kspace = torch.randn(2, 3, 20, 16, dtype=torch.complex64, generator=gen) * mask
    return kspace, mask


def test_factor_is_the_percentile_modulus_without_padded_coils():
    kspace, _ = masked_kspace()
    kspace[1, 2] = 0  # a padded coil: left out of the second sample's count
    factors = KspaceScaling(0.99).factors(kspace)
    for b, coils in ((0, 3), (1, 2)):
        values = np.sort(kspace[b, :coils].abs().numpy().ravel())[::-1]
        k = int(np.floor(0.01 * values.size)) + 1
        assert factors[b].item() == pytest.approx(float(values[k - 1]))
    assert KspaceScaling(1.0).factors(kspace)[0] == kspace[0].abs().max()
    assert KspaceScaling(0.5).factors(torch.zeros(1, 2, 4, 4, dtype=torch.complex64)) == 1


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, True, "0.9"])
def test_bad_percentile(bad):
    with pytest.raises(ConfigError, match="percentile"):
        KspaceScaling(bad)


def test_direct_import_records_the_rule_and_reconstruction_uses_it(tmp_path):
    src = tmp_path / "model.pt"
    torch.save(direct_layout(CONFIG), src)
    scaled, plain = tmp_path / "scaled.safetensors", tmp_path / "plain.safetensors"
    import_checkpoint(src, scaled, "direct")
    import_checkpoint(src, plain, "direct", scale_percentile=None)
    assert read_checkpoint(scaled).meta[META_KEY] == {"percentile": 0.99}
    assert META_KEY not in read_checkpoint(plain).meta
    with_rule, without = load_reconstructor("rvn", scaled), load_reconstructor("rvn", plain)
    assert with_rule.scaling == KspaceScaling(0.99) and without.scaling is None

    kspace, mask = masked_kspace(1)
    c = 1e-4  # a real scanner's k-space scale against the model's
    # image(y) = s model(y / s): with the rule the reconstruction follows the data's scale
    torch.testing.assert_close(with_rule(c * kspace, mask), c * with_rule(kspace, mask))
    # ... and equals the plain model on the k-space divided by its factor, times the factor
    s = KspaceScaling(0.99).factors(kspace).reshape(-1, 1, 1)
    expected = without(kspace / s[..., None], mask) * s
    torch.testing.assert_close(with_rule(kspace, mask), expected)
    # without it the network is not scale-equivariant (what the rule is for)
    low = without(c * kspace, mask) / c
    assert not torch.allclose(low, without(kspace, mask), rtol=1e-2)


def test_scale_percentile_option(tmp_path, capsys):
    src = tmp_path / "model.pt"
    torch.save(direct_layout(CONFIG), src)
    dst = tmp_path / "rvn.safetensors"
    args = ["import-checkpoint", str(src), str(dst), "--format", "direct"]
    assert main([*args, "--scale-percentile", "0.95"]) == 0
    assert read_checkpoint(dst).meta[META_KEY] == {"percentile": 0.95}
    assert main([*args, "--scale-percentile", "none"]) == 0
    assert META_KEY not in read_checkpoint(dst).meta
    assert main([*args, "--scale-percentile", "95"]) != 0
    assert "percentile" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only for --format direct"):
        _percentile("0.9", "fastmri-varnet")


def test_damaged_rule_names_the_checkpoint(tmp_path):
    src, dst = tmp_path / "model.pt", tmp_path / "rvn.safetensors"
    torch.save(direct_layout(CONFIG), src)
    import_checkpoint(src, dst, "direct")
    ckpt = read_checkpoint(dst)
    model, _ = load_model(dst)
    save_checkpoint(dst, "rvn", model, meta=ckpt.meta | {META_KEY: {"percentile": 2}})
    with pytest.raises(FileFormatError, match=r"rvn\.safetensors: kspace_scaling\.percentile"):
        load_reconstructor("rvn", dst)
