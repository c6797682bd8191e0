"""Where the text encoders live and compute, and the prompt-embedding cache, on the tiny backbone.

Text encoders never compute on a CPU in bf16 (about 9x slower than fp32 there): a CPU encode is
fp32. The ``swap`` placement rests on the CPU and computes on the GPU; on this CPU-only machine the
device table is checked for a CUDA device (no memory is touched) and the swap code path runs with
both ends on the CPU, encoding exactly what the encoders that stay encode.
"""

import pytest
import torch

from studio.engine.backbones.base import PromptCache, encoder_devices, resolve_placement
from studio.engine.backbones.flux import FluxBackbone
from studio.engine.backbones.quantize import ENCODER_PLACEMENTS
from studio.engine.backbones.tiny import TINY_DEFAULT_RESOLUTION, TINY_MAX_SEQUENCE_LENGTH

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PROMPTS = ["a red circle in flat poster style", "green hills in flat poster style"]


def load(tiny_folder, placement=None, precision="auto") -> FluxBackbone:
    return FluxBackbone.load("tiny", str(tiny_folder), device=CPU, precision=precision,
                             text_encoder_placement=placement, default_resolution=TINY_DEFAULT_RESOLUTION,
                             max_sequence_length=TINY_MAX_SEQUENCE_LENGTH)


def encoders(backbone) -> dict[str, torch.nn.Module]:
    return backbone.offload_modules()


def assert_conds_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=0)


def test_where_each_placement_rests_and_computes_on_a_gpu():
    assert encoder_devices("gpu", CUDA) == (CUDA, CUDA)  # offload_encoders moves them out while training
    assert encoder_devices("swap", CUDA) == (CPU, CUDA)  # stored on the CPU, moved in to encode
    assert encoder_devices("gpu-8bit", CUDA) == (CUDA, CUDA)
    assert encoder_devices("gpu-4bit", CUDA) == (CUDA, CUDA)
    assert encoder_devices("cpu-fp32", CUDA) == (CPU, CPU)
    for placement in ENCODER_PLACEMENTS:
        assert encoder_devices(placement, CPU) == (CPU, CPU)


def test_a_cpu_never_gets_bf16_text_encoders():
    for placement in (None, *ENCODER_PLACEMENTS):
        for dtype in (torch.bfloat16, torch.float16):
            assert resolve_placement(placement, False, CPU, dtype) == "cpu-fp32"
        assert resolve_placement(placement, False, CUDA, torch.bfloat16) == (placement or "gpu")
    assert resolve_placement(None, True, CUDA, torch.bfloat16) == "swap"  # the older offload flag
    assert resolve_placement(None, False, CPU, torch.float32) == "cpu-fp32"


def test_a_bf16_run_on_the_cpu_encodes_in_fp32(tiny_folder, tiny_backbone):
    backbone = load(tiny_folder, precision="bf16")
    assert backbone.text_encoder_placement == "cpu-fp32" and backbone.transformer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in encoders(backbone).values() for p in m.parameters())
    cond = backbone.encode_prompts(PROMPTS[:1])[0]
    assert cond["prompt_embeds"].dtype == torch.bfloat16  # handed on in the backbone's dtype
    reference = tiny_backbone.encode_prompts(PROMPTS[:1])[0]  # fp32 all the way
    torch.testing.assert_close(cond["prompt_embeds"].float(), reference["prompt_embeds"], atol=2e-2, rtol=2e-2)


def test_the_cpu_fp32_placement_has_fp32_text_encoders(tiny_folder):
    backbone = load(tiny_folder, "cpu-fp32")
    assert backbone.text_encoder_placement == "cpu-fp32"
    assert all(p.dtype == torch.float32 for m in encoders(backbone).values() for p in m.parameters())
    assert backbone.encoder_homes() == (CPU, CPU)


def test_swap_encodes_what_the_encoders_that_stay_encode(tiny_folder):
    stay, swap = load(tiny_folder, "gpu"), load(tiny_folder, "swap")
    assert swap.text_encoder_placement == "swap"
    at_forward = []
    for module in encoders(swap).values():
        module.register_forward_pre_hook(lambda m, _: at_forward.append(next(m.parameters()).device))
    for a, b in zip(stay.encode_prompts(PROMPTS), swap.encode_prompts(PROMPTS), strict=True):
        assert_conds_close(a, b, atol=0)
    rest, compute = swap.encoder_homes()
    assert at_forward and all(d == compute for d in at_forward)  # they computed where the placement computes
    assert all(next(m.parameters()).device == rest for m in encoders(swap).values())  # and went back to rest
    swap.offload_encoders()
    swap.restore_encoders()
    assert all(next(m.parameters()).device == rest for m in encoders(swap).values())


def test_an_8_bit_t5_stays_put_and_encodes_close_to_the_full_one(tiny_folder, tiny_backbone):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QTensor

    quantised = load(tiny_folder, "gpu-8bit")
    t5, clip = quantised.pipe.text_encoder_2, quantised.pipe.text_encoder
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q.weight, QTensor)  # T5 in 8 bits
    assert not any(isinstance(p, QTensor) for p in clip.parameters())  # CLIP as it was
    quantised.offload_encoders(to="meta")  # quantised encoders stay where they are
    assert next(t5.parameters()).device == CPU
    got = quantised.encode_prompts(PROMPTS[:1])[0]
    want = tiny_backbone.encode_prompts(PROMPTS[:1])[0]
    torch.testing.assert_close(got["pooled_prompt_embeds"], want["pooled_prompt_embeds"])  # CLIP: unchanged
    error = (got["prompt_embeds"] - want["prompt_embeds"]).abs().max() / want["prompt_embeds"].abs().max()
    assert error < 0.05


# -- the prompt-embedding cache ------------------------------------------------------------------------


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def test_a_repeated_prompt_is_not_encoded_again(tiny_folder):
    backbone = load(tiny_folder)
    t5_calls = count_forwards(backbone.pipe.text_encoder_2)
    first = backbone.encode_prompts([PROMPTS[0]])
    assert t5_calls[0] == 1
    second = backbone.encode_prompts([PROMPTS[0]])
    assert t5_calls[0] == 1  # served from the cache
    assert_conds_close(first[0], second[0], atol=0)
    assert first[0]["prompt_embeds"] is not second[0]["prompt_embeds"]  # callers get copies, never the cache's
    both = backbone.encode_prompts([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    assert t5_calls[0] == 2  # only the new prompt, once
    assert_conds_close(both[0], both[2], atol=0)
    backbone.max_sequence_length = 16  # another length is another conditioning
    assert backbone.encode_prompts([PROMPTS[0]])[0]["prompt_embeds"].shape[1] == 16 and t5_calls[0] == 3


def test_cached_prompts_need_no_text_encoders(tiny_folder):
    backbone = load(tiny_folder)
    before = backbone.encode_prompts(PROMPTS)
    backbone.offload_encoders(to="meta")  # gone: any encode would fail
    for a, b in zip(before, backbone.encode_prompts(PROMPTS), strict=True):
        assert_conds_close(a, b, atol=0)


def test_the_cache_is_bounded_by_bytes_and_drops_the_least_recently_used():
    cond = {"prompt_embeds": torch.zeros(256)}  # 1 KiB
    cache = PromptCache(max_bytes=3 * 1024)
    for name in "abc":
        cache.put((name,), dict(cond))
    assert cache.get(("a",)) is not None  # "a" is now the most recently used
    cache.put(("d",), dict(cond))
    assert cache.get(("b",)) is None and all(cache.get((k,)) is not None for k in "acd")
    assert cache.bytes == 3 * 1024 and len(cache) == 3
    cache.put(("huge",), {"prompt_embeds": torch.zeros(1024)})  # larger than the whole cache: not kept
    assert cache.get(("huge",)) is None and len(cache) == 3
