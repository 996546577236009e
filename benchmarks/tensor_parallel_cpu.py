"""What tensor parallelism (transformers' ``tp_plan="auto"``) does to captures, on CPU with 2 gloo ranks.

Prints, per rank: the logits' largest difference from the unsharded model, the shape of the ``z``
capture of layer 0 (the hooks recorder, :func:`mech_vqa.capture.trace`, called directly) and what
nnsight 0.8.1's tensor-parallel gathering does on the same model. Why ``VQAModel`` refuses a
tensor-parallel model (:func:`mech_vqa.backends.check_not_tensor_parallel`).

    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/tensor_parallel_cpu.py
"""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist


def main() -> None:
    from transformers import AutoModelForImageTextToText

    from mech_vqa.adapters import get_adapter
    from mech_vqa.build import tiny_llava
    from mech_vqa.capture import trace

    torch.set_num_threads(1)
    model, processor = tiny_llava(seed=0, kv_heads=2)
    folder = f"{tempfile.gettempdir()}/mech_vqa_tp_tiny"
    model.save_pretrained(folder)   # same seed on every rank: identical files
    sharded = AutoModelForImageTextToText.from_pretrained(folder, tp_plan="auto")
    rank = dist.get_rank()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    adapter = get_adapter(model)
    with torch.no_grad(), trace(sharded, get_adapter(sharded), ["z"], layers=[0]) as cache:
        try:
            logits = sharded(input_ids=ids).logits
        except Exception as err:  # noqa: BLE001 - report what happens
            logits = None
            print(f"rank {rank}: hooks capture failed: {type(err).__name__}: {err}")
    if logits is not None:
        print(f"rank {rank}: tp_size {getattr(sharded, '_tp_size', None)}, logits vs unsharded "
              f"{(logits - model(input_ids=ids).logits).abs().max().item():.1e}")
    raw = getattr(cache, "store", {}).get(("z", 0))
    print(f"rank {rank}: z of layer 0 as recorded: {None if raw is None else tuple(raw.shape)} "
          f"(whole: {adapter.n_heads} heads x {adapter.head_dim})")
    try:
        from nnsight.modeling.transformers import TransformersModel

        envoy = TransformersModel(sharded, task="image-text-to-text", processor=processor,
                                  tokenizer=processor.tokenizer)
        with envoy.trace(input_ids=ids):
            z = envoy.model.language_model.layers[0].self_attn.o_proj.input.save()
        print(f"rank {rank}: nnsight z: {tuple(z.shape)}")
    except Exception as err:  # noqa: BLE001 - report what happens
        print(f"rank {rank}: nnsight on the tensor-parallel model: {type(err).__name__}: {str(err)[:160]}")


if __name__ == "__main__":
    main()
