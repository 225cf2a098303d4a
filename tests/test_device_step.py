"""What a GPU step needs that a CPU run does not show, checked on CPU.

A pre-training step never makes the host wait for the GPU: no operator in it reads a device value back
(`.item()`, a Python branch on a tensor, `nonzero` or boolean indexing, whose output size the host must know).
On a GPU each such read drains the launch queue, and the host then launches the rest of the step while the GPU
idles. Counted below autograd for forward, loss, backward, the fp16 loss scaler and run_pretrain.py's optimizer
as it runs on CUDA (fused AdamW, per-unit lr with FreezeOut).

And every tensor a step makes is on the device of its input: run on PyTorch's `meta` device, where a tensor left
on the CPU (a table, an index, a mask) fails as it would on a GPU."""
import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models_mim
import run_pretrain
import util.misc as misc
from util import lr_sched, pipeline
from util.freezeout import FreezeOut, param_groups

READS_BACK = {'_local_scalar_dense', 'item', 'is_nonzero', 'equal', 'allclose', 'nonzero', 'masked_select',
              'unique', '_unique2', 'unique_consecutive', 'repeat_interleave'}


class HostReads(TorchDispatchMode):
    """Counts the operators that need a device value on the host."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ('index', 'index_put', 'index_put_') and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in READS_BACK or bool_index:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_the_reads_it_looks_for():
    x = torch.randn(8)
    with HostReads() as reads:
        x.sum().item()
        _ = x[x > 0]
        if x.max() > 0:
            pass
        (x.mul(2) + 1).exp()
    assert reads.ops == {'_local_scalar_dense': 2, 'index': 1}  # item and the branch; the boolean index


CASES = {
    'LocalMIM': ('MIM_vit_tiny_patch4', {}, False),
    'LocalMIM, FreezeOut original rules': ('MIM_vit_tiny_patch4', dict(cls_token_in_unit0=False,
                                                                       freeze_decoders=True), True),
    'LocalMIM, --all_stages --pos_embed rope --grad_ckpt': (
        'MIM_vit_tiny_patch4', dict(all_stages=True, pos_embed='rope', grad_ckpt=True), False),
    'MAE, --norm_pix_loss': ('mae_vit_tiny_patch4', dict(norm_pix_loss=True), False),
    'LocalMIM on Swin': ('MIM_swin_tiny_patch2_win4', {}, False),
    'LocalMIM on Swin, --target pixel, mask ratio 0.5': ('MIM_swin_tiny_patch2_win4',
                                                         dict(target='pixel', norm_pix_loss=True), False, 0.5),
}


@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
@pytest.mark.parametrize('case', list(CASES))
def test_a_training_step_reads_nothing_back_from_the_device(case, amp):
    name, kwargs, freezeout, ratio = (*CASES[case], 0.75)[:4]
    torch.manual_seed(0)
    model = models_mim.all_models()[name](img_size=32, **kwargs)
    args = run_pretrain.get_args_parser().parse_args(['--lr', '1e-3', '--epochs', '1', '--warmup_epochs', '0.25',
                                                      '--t_0', '0.5'])
    misc.set_schedule_steps(args, 8)
    schedule = FreezeOut.from_args(args, model) if freezeout else None
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, per_unit=freezeout), lr=args.lr, betas=(0.9, 0.95),
                                  fused=True)  # as run_pretrain.py on CUDA
    scaler = misc.LossScaler('cpu', enabled=amp == 'fp16')
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # a loader's batch
    noise = torch.rand(2, model.num_mask_units)
    for step in range(6):  # FreezeOut events and fused AdamW's first steps included
        if schedule is not None:
            schedule.update(model, step)
        with HostReads() as reads:
            lr_sched.adjust_learning_rate(optimizer, step, args, schedule)
            samples = pipeline.to_device(images, torch.device('cpu'), 32)
            with torch.autocast('cpu', dtype=misc.AMP_DTYPES[amp]):
                loss, losses = model(samples, ratio, noise)
            scaler(loss, optimizer, model.parameters())
            optimizer.zero_grad(set_to_none=True)
        assert not reads.ops, f'step {step}: {dict(reads.ops)}'
    assert schedule is None or model.frozen_units > 0


@pytest.mark.parametrize('case', list(CASES))
def test_a_step_keeps_every_tensor_on_the_device_of_its_input(case, monkeypatch):
    name, kwargs, freezeout, ratio = (*CASES[case], 0.75)[:4]
    real_autocast = torch.autocast  # the meta device has no autocast: HOG's fp32 region runs without one
    monkeypatch.setattr(torch, 'autocast', lambda device_type, **kw: contextlib.nullcontext()
                        if device_type == 'meta' else real_autocast(device_type, **kw))
    model = models_mim.all_models()[name](img_size=32, **kwargs).to('meta')
    if freezeout:
        model.set_frozen(range(2))
    images = torch.empty(2, 3, 32, 32, device='meta')
    for noise in (torch.empty(2, model.num_mask_units, device='meta'), None):  # None: the model draws it
        loss, losses = model(images, ratio, noise)
        loss.backward()
        assert loss.device.type == 'meta' and all(v.device.type == 'meta' for v in losses.values())
        assert all(p.grad.device.type == 'meta' for p in model.parameters() if p.grad is not None)
