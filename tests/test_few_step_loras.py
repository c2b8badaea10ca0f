"""A few-step LoRA (LCM, TCD, Hyper-SD, SDXL-Lightning) proposes the sampler, steps and guidance of its card: on the
command line (unless given) and in the app's LoRA picker."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cldm import cli
from cldm.adapters import few_step
from cldm.adapters.few_step import Proposal, proposal_for, proposal_for_name
from cldm.sampling.samplers import SAMPLERS


def _lora_file(path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    down = torch.zeros(4, 32)
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": down,
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": down.T.contiguous()},
              str(path), metadata=metadata)  # fmt: skip
    return path


# The published files' names (hub repos and the file names their cards give), and what each card asks for.
PUBLISHED = [
    ("lcm-lora-sdv1-5", Proposal("LCM-LoRA", "lcm", 4, 1.0)),
    ("lcm-lora-sdxl", Proposal("LCM-LoRA", "lcm", 4, 1.0)),
    ("TCD-SD15-LoRA", Proposal("TCD-LoRA", "tcd", 4, 1.0, 0.3)),
    ("TCD-SDXL-LoRA", Proposal("TCD-LoRA", "tcd", 4, 1.0, 0.3)),
    ("Hyper-SD15-8steps-lora", Proposal("Hyper-SD 8-step LoRA", "euler_trailing", 8, 1.0)),
    ("Hyper-SDXL-4steps-lora", Proposal("Hyper-SD 4-step LoRA", "euler_trailing", 4, 1.0)),
    ("Hyper-SDXL-12steps-CFG-lora", Proposal("Hyper-SD 12-step LoRA", "euler_trailing", 12, 5.0)),
    ("Hyper-SD15-1step-lora", Proposal("Hyper-SD 1-step LoRA", "tcd", 1, 1.0, 1.0)),
    ("sdxl_lightning_2step_lora", Proposal("SDXL-Lightning 2-step LoRA", "euler_trailing", 2, 1.0)),
    ("sdxl_lightning_8step_lora", Proposal("SDXL-Lightning 8-step LoRA", "euler_trailing", 8, 1.0)),
]


@pytest.mark.parametrize(("name", "expected"), PUBLISHED)
def test_published_names_propose_their_cards_settings(name, expected):
    assert proposal_for_name(name) == expected
    assert expected.sampler in SAMPLERS  # every proposed sampler exists


@pytest.mark.parametrize("name", ["add_detail", "epi_noiseoffset2", "pytorch_lora_weights", "more_details", "lcmx"])
def test_other_loras_propose_nothing(name):
    assert proposal_for_name(name) is None


def test_renamed_files_are_known_by_metadata_or_hub_folder(tmp_path):
    # the hub's cache: every LCM-LoRA downloads as pytorch_lora_weights.safetensors under its repo's folder
    repo = tmp_path / "models--latent-consistency--lcm-lora-sdv1-5"
    cached = repo / "snapshots" / "0abc" / "pytorch_lora_weights.safetensors"
    assert proposal_for(_lora_file(cached)).sampler == "lcm"
    # a trainer's name in the metadata wins over a renamed file's stem
    renamed = _lora_file(tmp_path / "loras" / "fast.safetensors", {"ss_output_name": "Hyper-SD15-4steps-lora"})
    assert proposal_for(renamed) == Proposal("Hyper-SD 4-step LoRA", "euler_trailing", 4, 1.0)
    assert proposal_for(_lora_file(tmp_path / "loras" / "style.safetensors")) is None
    damaged = tmp_path / "loras" / "broken.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert proposal_for(damaged) is None  # loading it reports the damage, not the proposal


def _args(tmp_path: Path, *words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_generate_args(parser)
    return parser.parse_args(["--base", str(tmp_path / "no-base"), "--prompt", "a cat", "--width", "64", "--height",
                              "64", *words])  # fmt: skip


def test_cli_takes_the_cards_settings_unless_given(tmp_path, capsys):
    lora = _lora_file(tmp_path / "lcm-lora-sdv1-5.safetensors")
    r = cli.request_from_args(_args(tmp_path, "--lora", str(lora)))
    assert (r.sampler, r.steps, r.cfg_scale) == ("lcm", 4, 1.0)
    err = capsys.readouterr().err
    assert "LCM-LoRA" in err and "--sampler lcm" in err and "--steps 4" in err
    # what the user gives stays; the rest comes from the card
    r = cli.request_from_args(_args(tmp_path, "--lora", f"{lora}:0.8", "--steps", "6", "--sampler", "euler"))
    assert (r.sampler, r.steps, r.cfg_scale) == ("euler", 6, 1.0)
    # TCD's gamma is the request's eta
    tcd = _lora_file(tmp_path / "TCD-SD15-LoRA.safetensors")
    r = cli.request_from_args(_args(tmp_path, "--lora", str(tcd)))
    assert (r.sampler, r.steps, r.eta) == ("tcd", 4, 0.3)
    # no few-step LoRA: the defaults, and nothing said
    other = _lora_file(tmp_path / "add_detail.safetensors")
    capsys.readouterr()
    r = cli.request_from_args(_args(tmp_path, "--lora", str(other)))
    assert (r.sampler, r.steps, r.cfg_scale, r.eta) == ("ddim", 20, 7.5, 0.0)
    assert capsys.readouterr().err == ""


def test_cli_prompt_tag_proposes_too(tmp_path):
    _lora_file(tmp_path / "loras" / "sdxl_lightning_4step_lora.safetensors")
    a = _args(tmp_path, "--lora-dir", str(tmp_path))
    a.prompt = "a cat <lora:sdxl_lightning_4step_lora:1>"
    r = cli.request_from_args(a)
    assert (r.sampler, r.steps, r.cfg_scale) == ("euler_trailing", 4, 1.0)


def test_app_picker_sets_the_settings_and_says_so(tmp_path):
    from studio.panels import _add_lora

    _lora_file(tmp_path / "loras" / "lcm-lora-sdxl.safetensors")
    _lora_file(tmp_path / "loras" / "TCD-SD15-LoRA.safetensors")
    _lora_file(tmp_path / "loras" / "add_detail.safetensors")
    before = (20, 7.5, "dpmpp_2m_karras", 0.0)
    prompt, *settings, note = _add_lora(str(tmp_path), "lcm-lora-sdxl", "a cat", *before)
    assert (prompt, *settings) == ("a cat <lora:lcm-lora-sdxl:1>", 4, 1.0, "lcm", 0.0)
    assert note["visible"] and "LCM-LoRA" in note["value"] and "change them" in note["value"]
    prompt, *settings, note = _add_lora(str(tmp_path), "TCD-SD15-LoRA", "a cat", *before)
    assert settings == [4, 1.0, "tcd", 0.3]  # TCD's gamma goes to the Eta slider
    prompt, *settings, note = _add_lora(str(tmp_path), "add_detail", "a cat", *before)
    assert (prompt, *settings) == ("a cat <lora:add_detail:1>", *before)
    assert note["visible"] is False
    # a name that is no file here proposes nothing; the tag still goes in (Generate names the missing file)
    assert _add_lora(str(tmp_path), "gone", "x", *before)[:5] == ("x <lora:gone:1>", *before)


def test_proposal_text_names_everything():
    text = few_step.Proposal("TCD-LoRA", "tcd", 4, 1.0, 0.3).text("TCD-SD15-LoRA.safetensors")
    assert (
        text == "TCD-SD15-LoRA.safetensors is a TCD-LoRA: its card asks for sampler tcd, gamma 0.3, 4 steps, guidance 1"
    )
