"""Serving exports beyond the method matrix's peft round trip: ONNX of a merged-and-unloaded model, the layout of
q/v slices in a peft LoRA, and the error for a model without adapters."""
import numpy as np
import pytest
import timm
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv


def test_merged_and_unloaded_model_runs_in_onnx_runtime(images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    config = nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"])
    model = as_if_trained(nv.inject(tiny_vit(), config), 7, scale=0.1, adapters_only=True)
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


def test_a_quantisation_aware_model_whose_values_lie_near_their_grid_exports_and_computes_what_it_does(tmp_path):
    # a 2-value head bias decodes a float32 step off itself, so the grid search ran inside the export's trace, where
    # its int32 view of a float ended in "INTERNAL ASSERT FAILED ... aten::view" (a PyTorch bug report request)
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nv.inject(tiny_vit(num_classes=2), "linear")
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.1, -0.3]))
    nv.set_quantization_aware(model, bits=8)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    session = ort.InferenceSession(str(nv.export_onnx(model, tmp_path / "qat.onnx")),
                                   providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_an_eva_exports_as_a_merged_graph(tmp_path):
    # EVA's forward takes is_causal=False: traced as the graph's own argument it became a tensor timm refused
    ort = pytest.importorskip("onnxruntime")
    import timm

    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3, img_size=28, patch_size=14,
                            embed_dim=32, depth=1, num_heads=2).eval()
    model = as_if_trained(nv.inject(eva, nv.LoRAConfig(rank=2, targets=["mlp.fc1"])), 0, scale=0.2)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    graph = nv.export_onnx(model, tmp_path / "eva.onnx")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=0, atol=1e-4)


def test_qv_slices_export_as_a_qkv_lora_with_zero_key_rows(tmp_path):
    from safetensors.torch import load_file

    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"]))
    nv.export_peft(as_if_trained(model, 7, scale=0.1, adapters_only=True), tmp_path)
    lora_b = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert lora_b.shape == (192, 8)
    assert not lora_b[64:128].any() and not lora_b[:64, 4:].any() and not lora_b[128:, :4].any()
    assert lora_b[:64, :4].any() and lora_b[128:, 4:].any()


def test_export_peft_of_a_model_without_adapters_says_to_inject_first(tmp_path):
    with pytest.raises(ValueError, match="inject or load an adapter"):
        nv.export_peft(tiny_vit(), tmp_path)


@pytest.mark.parametrize("method, trains", [("linear", "the head only"), ("full", "the whole backbone")])
def test_export_peft_of_a_method_without_adapter_layers_says_what_it_trains(method, trains, tmp_path):
    with pytest.raises(ValueError, match=rf"method '{method}' has no adapter layers \(it trains {trains}\): save it "
                                         "with nv.save_adapter"):
        nv.export_peft(nv.inject(tiny_vit(), method), tmp_path / "peft")


def test_export_peft_after_merge_and_unload_says_the_adapter_was_folded_in(tmp_path):
    model = nv.merge_and_unload(as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1, adapters_only=True))
    with pytest.raises(ValueError, match=r"hold 1 adapter\(s\) folded in by nv.merge_and_unload \(last: 'lora'\), "
                                         "which leaves no adapter to export: export before merge_and_unload"):
        nv.export_peft(model, tmp_path / "peft")


def test_export_peft_writes_the_same_bytes_every_time(tmp_path):
    # safetensors writes metadata keys in hash-map order, which changes from one save to the next
    model = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 3, scale=0.1, adapters_only=True)
    exports = {nv.export_peft(model, tmp_path / str(i)).joinpath("adapter_model.safetensors").read_bytes()
               for i in range(8)}
    assert len(exports) == 1


def test_export_peft_refuses_non_finite_tensors_and_keeps_the_previous_export(tmp_path):
    config = nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1"])
    nv.export_peft(as_if_trained(nv.inject(tiny_vit(), config), 7, scale=0.1, adapters_only=True), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = as_if_trained(nv.inject(tiny_vit(), config), 7, scale=0.1, adapters_only=True)
    with torch.no_grad():
        model.head.bias[1] = float("nan")
    with pytest.raises(ValueError, match="base_model.model.head.bias holds NaN or Inf"):
        nv.export_peft(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_export_peft_refuses_a_model_with_an_adapter_folded_into_its_weights(tmp_path):
    # the export holds the current adapter only: on a fresh base, the folded one would be missing from every logit
    model = nv.merge_and_unload(as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1, adapters_only=True))
    nv.inject(model, nv.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"hold 1 earlier adapter\(s\) folded in by nv.merge_and_unload"):
        nv.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_onnx_refuses_a_float64_model_onnx_runtime_cannot_run(tmp_path):
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)).double()
    with pytest.raises(ValueError, match=r"no float64 Conv .* export a float32 copy"):
        nv.export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("size", [(32, 32), 32, (3, 0, 32), (3.0, 32, 32), "3x32x32"])
def test_export_onnx_refuses_an_input_size_that_is_not_channels_height_width(size, tmp_path):
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
    with pytest.raises(ValueError, match=r"input_size must be 3 positive ints .*e\.g\. \(3, 32, 32\), the size"):
        nv.export_onnx(model, tmp_path / "model.onnx", input_size=size)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("size", [np.array([3, 32, 32]), torch.tensor([3, 32, 32]), torch.Size([3, 32, 32])],
                         ids=["numpy", "tensor", "torch.Size"])
def test_export_onnx_takes_an_input_size_as_an_array_as_it_takes_a_torch_size(size, tmp_path):
    pytest.importorskip("onnx")
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
    nv.export_onnx(model, tmp_path / "model.onnx", input_size=size)  # an array was refused, not 3 ints
    assert (tmp_path / "model.onnx").is_file()


def test_export_onnx_refuses_another_image_size_than_a_fixed_size_vit_was_built_for(tmp_path):
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
    with pytest.raises(ValueError, match=r"built for 32×32 images; export at \(3, 32, 32\), or build it with "
                                         r"img_size=\(48, 48\) for that size \(dynamic_img_size=True "
                                         r"resamples") as refused:
        nv.export_onnx(model, tmp_path / "model.onnx", input_size=(3, 48, 48))
    assert "(or dynamic_img_size=True)" not in str(refused.value)  # advice that export refused in turn
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("size, message", [
    ((1, 32, 32), r"input_size \(1, 32, 32\): the model takes 3-channel images; export at \(3, 32, 32\)"),
    ((3, 40, 40), r"40×40 is not a multiple of the model's 16×16 patches; export at a multiple \(e.g. \(3, 32, 32\)\)"),
    ((3, 48, 48), r"resamples its position embeddings .* ONNX has no operator for: export at \(3, 32, 32\)"),
])
def test_export_onnx_names_an_input_size_a_dynamic_size_vit_cannot_be_exported_at(size, message, tmp_path):
    # each failed deep in the trace, with torch's or timm's message (or an IR dump) and nothing naming input_size
    model = nv.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                                        img_size=32, dynamic_img_size=True, num_classes=3), nv.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=message):
        nv.export_onnx(model, tmp_path / "model.onnx", input_size=size)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("tasks_as_inputs", [False, True])
def test_export_onnx_refuses_a_model_using_an_operator_onnx_lacks_by_name(tasks_as_inputs, tmp_path):
    # NaFlexViT resamples its position embeddings with antialiased bicubic at every size: torch's exporter failed with
    # its UnsupportedOperatorError after an IR dump, naming neither the model nor that it cannot be exported
    model = nv.inject(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, img_size=32, patch_size=8,
                                        embed_dim=32, depth=1, num_heads=2, num_classes=3), nv.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"export_onnx: NaFlexVit's forward pass uses an operator that ONNX cannot "
                                         r"express \(.*'aten::_upsample_bicubic2d_aa'.*\), so the model cannot be "
                                         r"exported to ONNX"):
        nv.export_onnx(model.eval(), tmp_path / "model.onnx", input_size=(3, 32, 32), tasks_as_inputs=tasks_as_inputs)
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_names_input_size_for_a_model_that_records_no_image_size_and_fails_at_the_pretrained_one(
        images, tmp_path):
    # Hiera keeps no img_size: the export traced it at its pretrained config's 224 and failed deep inside torch
    hiera = timm.create_model("hiera_tiny_224", pretrained=False, img_size=32, embed_dim=16, num_heads=1,
                              stages=(1, 1, 1, 1), num_classes=3)
    model = nv.inject(hiera, nv.LoRAConfig(rank=2, targets=["attn.qkv"]))
    with pytest.raises(ValueError, match=r"Hiera records no image size of its own, and a pass at its pretrained "
                                         r"config's 224×224 fails .*pass input_size=\(3, H, W\)"):
        nv.export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists() and model.training  # its mode is given back
    ort = pytest.importorskip("onnxruntime")
    path = nv.export_onnx(model, tmp_path / "model.onnx", input_size=(3, 32, 32))
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    assert abs(ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})[0] - expected).max() < 1e-4
    mvit = timm.create_model("mvitv2_tiny", pretrained=False, img_size=64, num_classes=3)  # an IndexError in timm
    with pytest.raises(ValueError, match=r"MultiScaleVit records no image size of its own, and a pass at its "
                                         r"pretrained config's 224×224 fails \(IndexError: .*pass input_size"):
        nv.export_onnx(nv.inject(mvit, nv.LoRAConfig(rank=2, targets=["attn.qkv"])), tmp_path / "model.onnx")
