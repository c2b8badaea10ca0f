"""bf16 convolutions on prepacked oneDNN weights (cldm/prepack.py): the same numbers as F.conv2d, repacked after an
in-place weight change (a LoRA merge), left alone off bf16, and what the manager turns on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cldm.runtime import prepack

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this PyTorch build has no oneDNN")


def _conv(cin=8, cout=16, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, 3, **{"padding": 1, **kw}).to(torch.bfloat16).requires_grad_(False)


@pytest.mark.parametrize("kw", [{}, {"stride": 2}, {"groups": 2}, {"bias": False}, {"dilation": 2, "padding": 2}])
def test_a_packed_convolution_gives_f_conv2d_numbers(kw):
    conv = _conv(**kw)
    x = torch.randn(2, 8, 12, 12).to(torch.bfloat16)
    want = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert prepack.enable(conv) == 1 and prepack.is_enabled(conv)
    got = conv(x)
    assert got.shape == want.shape and torch.equal(got.contiguous(), want.contiguous())
    y = torch.randn(1, 8, 7, 9).to(torch.bfloat16)  # another size: the same packed weights serve it
    want = F.conv2d(y, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.equal(conv(y).contiguous(), want.contiguous())


def test_an_in_place_change_repacks():
    conv = _conv()
    prepack.enable(conv)
    x = torch.randn(1, 8, 10, 10).to(torch.bfloat16)
    before, original = conv(x), conv.weight.clone()
    with torch.no_grad():
        conv.weight.add_(0.5)  # what a LoRA merge does
    after = conv(x)
    assert torch.equal(after.contiguous(), F.conv2d(x, conv.weight, conv.bias, 1, 1).contiguous())
    assert not torch.equal(before, after)
    with torch.no_grad():
        conv.weight.copy_(original)  # and its undo (lora.restore copies the kept weights back)
    assert torch.equal(conv(x), before)


def test_left_alone_where_it_does_not_apply():
    fp32 = nn.Conv2d(4, 4, 3, padding=1)
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect").to(torch.bfloat16)
    same = nn.Conv2d(4, 4, 3, padding="same").to(torch.bfloat16)
    assert prepack.enable(nn.Sequential(fp32, reflect, same)) == 0
    conv = _conv()
    prepack.enable(conv)
    x = torch.randn(1, 8, 6, 6)  # an fp32 input to a bf16 layer: the plain path (and its error) as before
    with pytest.raises(RuntimeError):
        conv(x)
    prepack.disable(conv)
    assert not prepack.is_enabled(conv) and "forward" not in conv.__dict__


def test_a_whole_unet_stays_within_bf16_rounding(ours):
    sd, cn = ours
    unet = type(sd.unet)(sd.unet.cfg)
    unet.load_state_dict(sd.unet.state_dict())
    unet = unet.to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    ctx = torch.randn(2, 77, sd.config.unet.context_dim).to(torch.bfloat16)
    with torch.no_grad():
        plain = unet(x, torch.tensor(500), ctx).float()
        assert prepack.enable(unet) > 10
        packed = unet(x, torch.tensor(500), ctx).float()
    ulp = plain.abs().max().item() * 2**-7  # bf16 keeps 8 significant bits
    assert (plain - packed).abs().max().item() <= 4 * ulp


def test_the_manager_packs_on_a_bf16_cpu_only(tiny_dirs):
    from cldm.pipeline.request import GenerationRequest
    from cldm.runtime.manager import ModelManager

    bf16 = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="bf16")
    fp32 = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    off = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="bf16", prepack_cpu=False)
    assert prepack.is_enabled(bf16.sd.unet) and prepack.is_enabled(bf16.sd.vae)
    assert not prepack.is_enabled(fp32.sd.unet) and not prepack.is_enabled(off.sd.unet)
    r = GenerationRequest("a red square", steps=3, width=64, height=64, seed=3)
    a, b = bf16.run(r).images.astype(int), off.run(r).images.astype(int)
    assert np.abs(a - b).mean() < 2.0  # the same picture up to bf16 rounding


def test_the_packed_copies_count_in_the_controlnet_cache():
    """The packed copies are as large as the convolutions' weights again: the cache's memory bound counts them."""
    from cldm.runtime.manager import module_bytes

    m = nn.Sequential(_conv(), nn.ReLU(), _conv(16, 16))
    plain = sum(p.numel() * p.element_size() for p in m.parameters())
    prepack.enable(m)
    assert module_bytes(m) == plain  # nothing packed before the first call
    m(torch.randn(1, 8, 16, 16, dtype=torch.bfloat16))
    weights = sum(c.weight.numel() * c.weight.element_size() for c in (m[0], m[2]))
    assert prepack.packed_bytes(m) >= weights and module_bytes(m) == plain + prepack.packed_bytes(m)
    prepack.disable(m)
    assert module_bytes(m) == plain


def test_no_prepack_reaches_the_manager_from_the_cli(tiny_dirs, tmp_path, monkeypatch):
    """`generate --no-prepack` runs bf16 on plain convolutions: the picture of ModelManager(prepack_cpu=False)."""
    from PIL import Image

    from cldm.__main__ import main
    from cldm.pipeline.request import GenerationRequest
    from cldm.runtime import manager as manager_module
    from cldm.runtime.manager import ModelManager

    made = []
    real = manager_module.ModelManager.__init__

    def spy(self, *args, **kw):
        real(self, *args, **kw)
        made.append(self.prepack_cpu)

    monkeypatch.setattr(manager_module.ModelManager, "__init__", spy)
    base = ["generate", "--base", str(tiny_dirs[0]), "--prompt", "a red square", "--steps", "2", "--width", "64",
            "--height", "64", "--seed", "3", "--device", "cpu", "--dtype", "bf16"]  # fmt: skip
    assert main([*base, "--no-prepack", "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "packed.png")]) == 0
    assert made == [False, True]
    monkeypatch.setattr(manager_module.ModelManager, "__init__", real)
    r = GenerationRequest("a red square", steps=2, width=64, height=64, seed=3)
    want = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="bf16", prepack_cpu=False).run(r).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")), want)
