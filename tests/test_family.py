"""The model family: one record that the configs, loaders and defaults ask."""

from __future__ import annotations

import dataclasses

import pytest

from cldm.models.config import LATENT_SCALE, UNetConfig, VAEConfig
from cldm.models.family import FAMILIES, SD15, family, family_name_for_context


def test_sd15_is_the_only_family_and_is_found_by_name():
    assert list(FAMILIES) == ["SD1.5"]
    assert family("SD1.5") is SD15 and family("sd15") is SD15
    with pytest.raises(KeyError, match="known: SD1.5"):
        family("SDXL")
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD15.native_size = 768  # type: ignore[misc]


def test_the_configs_and_defaults_follow_the_family():
    from cldm.io.checkpoints import CONTROL_PREFIX, UNET_PREFIX
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
