"""SinkGD inside training stacks we did not write: the README's Hugging Face Trainer and accelerate recipes under
DeepSpeed ZeRO-2 on 2 CPU ranks equal one process with plain SinkGD, and sharding SinkGD cannot read is refused."""
import os
import subprocess

import pytest
import torch
from torch import nn

import sinkgd_zero
from common import REPO, launcher
from sinkgd import SinkGD, sinkgd_param_groups
from sinkgd_zero import ZeroSinkGD

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
import hf_deepspeed_driver as driver  # noqa: E402


def run_driver(recipe, out_dir, *model_and_stage, ranks=2):
    return subprocess.run(launcher(ranks) + [str(REPO / "tests" / "hf_deepspeed_driver.py"), recipe, str(out_dir),
                                             *model_and_stage],
                          cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def one_process():
    """The initial weights, and the weights after the driver's 3 steps as one process with plain SinkGD: each step
    on all 8 of its sequences at once."""
    cache = {}

    def get(name):
        if name not in cache:
            model, data = driver.tiny_model_and_data(name)
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            optimizer = SinkGD(sinkgd_param_groups(model, driver.blocks(model), lr=driver.LR))
            for step in range(driver.STEPS):
                ids = torch.stack([d["input_ids"] for d in data[8 * step:8 * step + 8]])
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            cache[name] = initial, model.state_dict()
        return cache[name]
    return get


# Mixtral's experts are 3-D stacks, (experts, out, in): under ZeRO each expert is its own matrix in the partition.
@pytest.mark.parametrize("recipe, model, stage", [("accelerate", "llama", "2"), ("trainer", "mixtral", "2"),
                                                  ("trainer", "mixtral", "3")])
def test_recipe_under_deepspeed_equals_one_process(recipe, model, stage, one_process, tmp_path):
    proc = run_driver(recipe, tmp_path, model, stage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    initial, expected = one_process(model)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["zero_partitions"] >= 1  # the SinkGD group reached the step as ZeRO partitions
    weights = result["weights"]
    assert weights.keys() == expected.keys()
    errors = {name: ((weights[name] - initial[name]) - (ref - initial[name])).norm() / (ref - initial[name]).norm()
              for name, ref in expected.items()}
    assert max(errors.values()) <= 1e-5, (errors, proc.stdout[-2000:])  # each weight's change; measured ~1e-6


def test_plain_sinkgd_under_deepspeed_is_refused(tmp_path):
    """What a user could write before sinkgd_zero was installable: ZeRO-2 hands each SinkGD group over as one flat
    partition, whose SR-Sinkhorn is sign(G). The step refuses it, in one line naming the fix."""
    proc = run_driver("trainer-plain-sinkgd", tmp_path, ranks=1)  # refused alike on any number of ranks
    assert proc.returncode != 0 and not (tmp_path / "result.pt").exists()
    assert ("RuntimeError: SinkGD: matrices [(32, 32), (16, 32), (16, 32)] became tensors shaped [(18432,)]; "
            "SR-Sinkhorn of flat or sharded pieces is sign descent, not Alg. 3: under DeepSpeed use "
            "sinkgd_zero.ZeroSinkGD") in proc.stderr, proc.stderr[-3000:]


def test_transposed_matrices_under_zero_are_refused(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): the sharded SR-Sinkhorn reads rows as the paper's rows, so under
    ZeRO 1-3 such a group is refused when attached, not stepped in the wrong orientation."""
    proc = run_driver("trainer", tmp_path, "gpt2", "2", ranks=1)  # refused alike on any number of ranks
    assert proc.returncode != 0 and not (tmp_path / "result.pt").exists()
    assert ("ValueError: ZeroSinkGD: param group 0 holds (in, out) matrices (transposed=True), which sinkgd_zero "
            "does not read: train it at ZeRO stage 0") in proc.stderr, proc.stderr[-3000:]


def test_zero_sinkgd_refuses_to_train_before_attach():
    """DeepSpeed's own zero-gradient step while it builds its stage-0 bf16/fp16 wrapper is ignored; a real gradient
    before attach() means attach was forgotten, and would train flat partitions as matrices."""
    torch.manual_seed(0)
    weight, norm = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.ones(6))
    optimizer = ZeroSinkGD([dict(params=[weight]), dict(params=[norm], sinkgd=False)], lr=0.1)
    before = [weight.detach().clone(), norm.detach().clone()]
    weight.grad, norm.grad = torch.zeros_like(weight), torch.zeros_like(norm)
    optimizer.step()
    assert torch.equal(weight, before[0]) and torch.equal(norm, before[1]) and not optimizer.state
    weight.grad = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"before attach\(\): call optimizer.attach\(engine\)"):
        optimizer.step()
    with pytest.raises(ValueError, match="SGD does not wrap this optimizer"):
        optimizer.attach(torch.optim.SGD([norm], lr=0.1))
    optimizer.attach(optimizer)  # no DeepSpeed between: plain SinkGD
    optimizer.step()
    assert not torch.equal(weight, before[0])


def test_trainer_callback_names_the_missing_optimizer():
    """The Trainer under DeepSpeed ignores optimizers= and builds AdamW: the callback says how to hand it SinkGD."""
    callback = sinkgd_zero.trainer_callback()
    with pytest.raises(ValueError, match=r"optimizer \(SGD\) is no ZeroSinkGD: pass optimizer_cls_and_kwargs"):
        callback.on_train_begin(None, None, None, optimizer=torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1))
