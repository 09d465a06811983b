"""The README's recipes for SinkGD under someone else's DeepSpeed, run under torchrun by tests/test_integrations.py:
    hf_deepspeed_driver.py {trainer,accelerate,trainer-plain-sinkgd} OUT_DIR
3 steps of a tiny transformers LLaMA, 2 ranks x 4 sequences (step k: sequences 8k..8k+7), ZeRO-2, fp32, constant lr.
Rank 0 saves the weights, and how many ZeRO partitions SinkGD stepped, to OUT_DIR/result.pt."""
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sinkgd_zero  # noqa: E402
from sinkgd import SinkGD, sinkgd_param_groups  # noqa: E402
from sinkgd_zero import ZeroSinkGD  # noqa: E402

LR, STEPS, PER_RANK = 0.02, 3, 4


def tiny_llama_and_data():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (8 * STEPS, 33), generator=torch.Generator().manual_seed(0))
    return model, [{"input_ids": x, "labels": x} for x in ids]


def with_trainer(out_dir, optimizer_cls, callbacks):
    model, data = tiny_llama_and_data()
    ds_config = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto", "gradient_clipping": "auto",
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    args = transformers.TrainingArguments(out_dir, max_steps=STEPS, per_device_train_batch_size=PER_RANK,
                                          learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
                                          train_sampling_strategy="sequential", deepspeed=ds_config, use_cpu=True,
                                          report_to=[], save_strategy="no", disable_tqdm=True)
    groups = sinkgd_param_groups(model, model.model.layers, lr=LR)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=(optimizer_cls, {"params": groups}),
                                   callbacks=callbacks)
    trainer.train()
    return trainer.model, trainer.optimizer


def with_accelerate(out_dir):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin
    model, data = tiny_llama_and_data()
    ds_config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": PER_RANK,
                 "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}
    # accelerate finds the ranks of a CPU-only machine only when told it is one; the Trainer does this for use_cpu
    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    optimizer = ZeroSinkGD(sinkgd_param_groups(model, model.model.layers, lr=LR))
    loader = torch.utils.data.DataLoader(data, batch_size=PER_RANK)
    engine, wrapped, loader = accelerator.prepare(model, optimizer, loader)
    optimizer.attach(wrapped)
    for batch in loader:

        accelerator.backward(engine(**batch).loss)
        wrapped.step()
        wrapped.zero_grad()
    return engine.module, wrapped


if __name__ == "__main__":
    recipe, out_dir = sys.argv[1:]
    if recipe == "accelerate":
        model, optimizer = with_accelerate(out_dir)
    elif recipe == "trainer":
        model, optimizer = with_trainer(out_dir, ZeroSinkGD, [sinkgd_zero.trainer_callback()])
    else:  # what worked before sinkgd_zero was installable: plain SinkGD, its groups now ZeRO-2 partitions
        model, optimizer = with_trainer(out_dir, SinkGD, [])
    while not isinstance(optimizer, ZeroSinkGD):
        optimizer = optimizer.optimizer
    if torch.distributed.get_rank() == 0:  # and whether SinkGD met ZeRO's partitions, not whole matrices (e.g. DDP)
        torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "zero_partitions": len(optimizer.partitions)}, Path(out_dir) / "result.pt")
