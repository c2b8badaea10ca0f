"""A ControlNet in diffusers' keys saved as one bare file (lllyasviel's `diffusers_xl_*.safetensors` of
sd_control_collection are such files): no config beside it, transformer depths above one. Read from the keys alone,
module by module, it gives diffusers' residuals. (What shapes cannot tell, head width 64, 32 GroupNorm groups and
256-wide size embeddings, is SDXL's and the loader's default: the tiny model has those.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cldm.io import checkpoints
from cldm.models.unet import timestep_embedding

TOL = 1e-4  # fp32, tiny random weights: the residuals agree to rounding


@pytest.fixture(scope="module")
def bare_file(tmp_path_factory):
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    ref = ControlNetModel(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=(1, 1), transformer_layers_per_block=(1, 2),
        conditioning_embedding_out_channels=(16, 32), norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=32 + 6 * 256,
    ).eval()  # fmt: skip
    for p in ref.parameters():  # wake the zero convs so the residuals are not all zero
        if not p.any():
            p.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("cn") / "diffusers_xl_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


def test_a_bare_diffusers_controlnet_with_deep_transformers_gives_diffusers_residuals(bare_file):
    ref, path = bare_file
    ours = checkpoints.load_controlnet(path)
    g = torch.Generator().manual_seed(1)
    x, hint = (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.rand(1, 3, 32, 32, generator=g),
    )  # the hint block halves once
    ctx, pooled = torch.randn(1, 77, 32, generator=g), torch.randn(1, 32, generator=g)
    ids, t = torch.tensor([[64.0, 64, 0, 0, 64, 64]]), torch.tensor([500])
    with torch.no_grad():
        down, mid = ref(x, t, ctx, hint, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)
        y = torch.cat([pooled, timestep_embedding(ids.flatten(), 256).reshape(1, -1)], dim=-1)
        got = ours(x, t, ctx, ours.embed_hint(hint), y)
    want = [*down, mid]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and b.abs().max() > 0
        assert (a - b).abs().max() <= TOL
