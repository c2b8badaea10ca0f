"""The model family: one record that the configs, loaders and defaults ask."""

from __future__ import annotations

import dataclasses

import pytest

from cldm.models.config import LATENT_SCALE, UNetConfig, VAEConfig, family_of_config
from cldm.models.family import FAMILIES, SD2, SD15, SDXL, family, family_name_for_context


def test_three_families_found_by_any_spelling():
    assert list(FAMILIES) == ["SD1.5", "SD2.x", "SDXL"]
    assert family("SD1.5") is SD15 and family("sd15") is SD15
    assert family("SDXL") is SDXL and family("sdxl") is SDXL
    assert family("SD2.1") is SD2 and family("sd2") is SD2 and family("SD2.x") is SD2
    with pytest.raises(KeyError, match="known: SD1.5, SD2.x, SDXL"):
        family("SD3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD15.native_size = 768  # type: ignore[misc]


def test_the_family_records_say_what_differs():
    assert (SDXL.latent_scale, SDXL.native_size, SDXL.context_dim, SDXL.pooled) == (0.13025, 1024, 2048, True)
    assert (SDXL.text_layer, SDXL.text_final_norm, SDXL.text_pads) == (-2, False, ("<|endoftext|>", "!"))
    assert (SD2.context_dim, SD2.prediction, SD2.native_size, SD2.alternate_size) == (1024, "v", 768, 512)
    assert SD2.text_pads == ("!",) and SD15.text_pads == ("<|endoftext|>",) and not SD15.zero_empty_negative
    # a config's family comes from its structure, never its name
    assert family_of_config(UNetConfig()) == "SD1.5"
    assert family_of_config(UNetConfig(use_linear_in_transformer=True, head_channels=64)) == "SD2.x"
    assert family_of_config(UNetConfig(use_linear_in_transformer=True, adm_in_channels=2816)) == "SDXL"


def test_the_configs_and_defaults_follow_the_family():
    from cldm.io.identify import CONTROL_PREFIX, UNET_PREFIX
    from cldm.io.locate import DEFAULT_BASE_REPO, IP_ADAPTERS

    assert LATENT_SCALE == SD15.latent_scale == 0.18215 and VAEConfig().scale_factor == SD15.latent_scale
    assert UNetConfig().context_dim == SD15.context_dim and UNetConfig().in_channels == SD15.latent_channels
    assert VAEConfig().downsample_factor == SD15.vae_factor and not SD15.pooled and SD15.prediction == "epsilon"
    assert (UNET_PREFIX, CONTROL_PREFIX) == (SD15.unet_prefix, SD15.control_prefix)
    assert (DEFAULT_BASE_REPO, IP_ADAPTERS[0]) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "ip-adapter_sd15")


def test_families_are_named_by_their_context_width():
    assert family_name_for_context(768) == "SD1.5"
    assert family_name_for_context(2048) == "SDXL" and family_name_for_context(1024) == "SD2.x"
    assert family_name_for_context(5) == "an unknown family"
