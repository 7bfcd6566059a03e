"""Serving exports: ONNX of a merged-and-unloaded model, and peft LoRA adapters with equal logits."""
import json

import pytest
import torch
from test_unload import trained_model
from tiny_models import tiny_vit

import nola_vision as nv


def test_merged_and_unloaded_model_runs_in_onnx_runtime(images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    config = nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"])
    model = trained_model(config)
    with torch.no_grad():
        adapted = model(images)
    nv.merge_and_unload(model)
    path = tmp_path / "model.onnx"
    # The legacy exporter: the dynamo one needs onnxscript, which the dev extra does not install.
    torch.onnx.export(model, (images,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": images[:3].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(logits), adapted[:3], rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [
    nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1", "mlp.fc2"]),
    nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, basis="per_layer", scale=3.0, targets=["attn.q", "attn.v"]),
    nv.LoRAConfig(rank=4, alpha=8, targets=["attn.q", "attn.v", "mlp.fc1"]),
], ids=["nola_mlp", "nola_per_layer_qv", "lora_qv_fc1"])
def test_peft_loads_the_export_with_the_same_logits(config, images, tmp_path):
    peft = pytest.importorskip("peft")
    model = trained_model(config)
    with torch.no_grad():
        model.head.weight.mul_(-2.0)  # a trained head travels as modules_to_save
        adapted = model(images)
    nv.export_peft(model, tmp_path / "peft")
    stored = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert stored["peft_type"] == "LORA" and stored["modules_to_save"] == ["head"]
    served = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        logits = served(images)
    assert (logits - adapted).abs().max() <= 1e-4
    assert (tiny_vit()(images) - adapted).abs().max() > 1e-2  # the adapters and head do change the logits


def test_qv_slices_export_as_a_qkv_lora_with_zero_key_rows(tmp_path):
    from safetensors.torch import load_file

    nv.export_peft(trained_model(nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"])), tmp_path)
    lora_b = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert lora_b.shape == (192, 8)
    assert not lora_b[64:128].any() and not lora_b[:64, 4:].any() and not lora_b[128:, :4].any()
    assert lora_b[:64, :4].any() and lora_b[128:, 4:].any()


@pytest.mark.parametrize("adapter", ["linear", "full"])
def test_export_peft_names_why_a_plain_method_has_no_lora(adapter, tmp_path):
    with pytest.raises(ValueError, match=f"{adapter!r} has no adapter layers"):
        nv.export_peft(nv.inject(tiny_vit(), adapter), tmp_path)
    with pytest.raises(ValueError, match="inject or load an adapter"):
        nv.export_peft(tiny_vit(), tmp_path)


def test_export_peft_refuses_non_finite_tensors_and_keeps_the_previous_export(tmp_path):
    config = nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1"])
    nv.export_peft(trained_model(config), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = trained_model(config)
    with torch.no_grad():
        model.head.bias[1] = float("nan")
    with pytest.raises(ValueError, match="base_model.model.head.bias holds NaN or Inf"):
        nv.export_peft(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
