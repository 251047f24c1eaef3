"""Merged, dequantised full weights of a (Q)LoRA or plain model, computed out of place.

`merged_weights(model)` yields `(name, tensor)` pairs under the plain Hugging Face names of the base architecture
(the keys of its unquantized `state_dict`): a plain model's tensors as they are; a LoRA-wrapped linear layer as
W + scale·B·A (peft's LoRA, arXiv 2106.09685; scale = alpha / r); a bitsandbytes NF4 weight dequantised first
(`bitsandbytes.functional.dequantize_4bit`); FSDP2 shards gathered (`full_tensor`) before merging. Nothing is
merged into the model: its parameters, and so the adapter-off reference, stay bit-identical (an in-place
merge/unmerge on a 4-bit base re-quantises and drifts). Used to push weights into vLLM and to export a QLoRA model
as a plain checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import Tensor


def hf_weight_name(name: str) -> str:
    """A peft parameter name mapped to the base model's name ("base_model.model." and ".base_layer" dropped)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: an FSDP2 `DTensor` shard is all-gathered (a collective: every rank calls it in the same
    order); a plain tensor is returned as is. Merging is done on gathered tensors, not on shards."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _is_lora_layer(module: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _is_4bit_linear(module: torch.nn.Module) -> bool:
    return "bitsandbytes" in sys.modules and isinstance(module, sys.modules["bitsandbytes"].nn.Linear4bit)


def _is_8bit_linear(module: torch.nn.Module) -> bool:
    return "bitsandbytes" in sys.modules and isinstance(module, sys.modules["bitsandbytes"].nn.Linear8bitLt)


def is_kbit_linear(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (False without bitsandbytes imported: none can exist)."""
    return _is_4bit_linear(module) or _is_8bit_linear(module)


def dense_weight(linear: torch.nn.Module) -> Tensor:
    """The weight of a linear layer as a dense tensor (NF4 / FP4 weights dequantised; a new tensor, never a view
    that could be written back)."""
    if _is_4bit_linear(linear):
        import bitsandbytes.functional as bnbf

        weight = linear.weight
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    if _is_8bit_linear(linear):
        raise ValueError("merged weights of an 8-bit base are not supported; use model.quantization: 4bit")
    return full_tensor(linear.weight.detach())


def lora_delta(layer: torch.nn.Module) -> Tensor | None:
    """Σ over active adapters of scale·B·A (fp32, in the base weight's [out, in] layout), or None when no adapter
    is active on this layer."""
    if layer.merged:
        raise ValueError("the LoRA adapter is merged into the base weights in place; unmerge it first")
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if layer.use_dora.get(name, False):
            raise ValueError(f"adapter {name!r} uses DoRA; merged weights support plain LoRA only")
        a = full_tensor(layer.lora_A[name].weight.detach()).float()
        b = full_tensor(layer.lora_B[name].weight.detach()).float()
        d = (b @ a) * layer.scaling[name]
        if layer.fan_in_fan_out:
            d = d.T
        delta = d if delta is None else delta + d
    return delta


def _merged_linear(layer: torch.nn.Module, prefix: str, dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
    base = layer.base_layer
    weight = dense_weight(base)
    out_dtype = dtype or weight.dtype
    delta = lora_delta(layer)
    if delta is not None:
        weight = weight.float() + delta.to(weight.device)
    yield prefix + "weight", weight.to(out_dtype)
    if base.bias is not None:
        yield prefix + "bias", full_tensor(base.bias.detach()).to(out_dtype)


def _walk(module: torch.nn.Module, prefix: str, dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
    if _is_lora_layer(module):
        yield from _merged_linear(module, prefix, dtype)
        return
    if _is_4bit_linear(module) or _is_8bit_linear(module):
        weight = dense_weight(module)
        yield prefix + "weight", weight.to(dtype or weight.dtype)
        if module.bias is not None:
            yield prefix + "bias", module.bias.detach().to(dtype or weight.dtype)
        return
    for name, param in module._parameters.items():
        if param is not None:
            param = full_tensor(param.detach())
            yield prefix + name, (param if dtype is None else param.to(dtype))
    for name, buf in module._buffers.items():
        if buf is not None and name not in module._non_persistent_buffers_set:
            buf = full_tensor(buf)
            yield prefix + name, buf if dtype is None or not buf.is_floating_point() else buf.to(dtype)
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, prefix + name + ".", dtype)


@torch.no_grad()
def merged_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """Full weights of `model` under the base model's Hugging Face names, LoRA merged and 4-bit dequantised.

    Tensors are yielded one at a time (a merged layer is materialised only while it is consumed); the model is
    never modified.

    Args:
        model: a `PreTrainedModel` or a `peft.PeftModel` (LoRA, optionally on a bitsandbytes 4-bit base).
        dtype: cast floating tensors to this dtype (e.g. bfloat16 for vLLM); None keeps each tensor's dtype
            (dequantised weights: the quantisation's compute dtype).
    """
    for name, tensor in _walk(model, "", dtype):
        yield hf_weight_name(name), tensor
