"""Mixed precision on CPU: the fp16 loss scaler's skipped steps and its checkpointed state, bf16/fp16 autocast
keeping HOG targets and losses in fp32, and AMP losses close to fp32. (fp16 matmuls are about 90x slower than
bf16 on CPUs without fp16 units, hence single forward passes here.)"""
import argparse

import pytest
import torch

import models_mim
import util.misc as misc
from util import checkpoint


def tiny(name='MIM_vit_tiny_patch4'):
    torch.manual_seed(0)
    return models_mim.MODELS[name]()


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, 64, generator=g)


def test_fp16_overflow_skips_the_update_lowers_the_scale_and_the_run_goes_on():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = misc.LossScaler('cpu', enabled=True)
    x, noise = batch()
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = model(x, 0.75, noise)
    scaler(loss * float('inf'), opt, model.parameters())
    opt.zero_grad(set_to_none=True)
    assert scaler.state_dict()['scale'] == 2. ** 15  # halved from 2**16
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # AdamW never stepped: its moments and step count are untouched
    loss, _ = model(x, 0.75, noise)
    scaler(loss, opt, model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loss_scaler_state_is_checkpointed_and_restored(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = misc.LossScaler('cpu', enabled=True)
    x, noise = batch()
    for factor in (float('inf'), 1., 1.):  # one overflow, then two good steps: scale 2**15, growth tracker 2
        loss, _ = model(x, 0.75, noise)
        scaler(loss * factor, opt, model.parameters())
        opt.zero_grad(set_to_none=True)
    args = argparse.Namespace(output_dir=str(tmp_path), model='MIM_vit_tiny_patch4', resume='', auto_resume=True,
                              seed=0, start_epoch=0, epochs=2)
    checkpoint.save_checkpoint(args, 0, 3, model, opt, scaler, 'last')
    restored, again = misc.LossScaler('cpu', enabled=True), tiny()  # a new run in the same output_dir auto-resumes
    checkpoint.resume_from_checkpoint(args, *checkpoint.load_resume_checkpoint(args), again,
                                      torch.optim.AdamW(again.parameters(), lr=1e-3), restored)
    assert args.start_epoch == 1 and restored.state_dict() == scaler.state_dict()
    assert restored.state_dict()['scale'] == 2. ** 15 and restored.state_dict()['_growth_tracker'] == 2


@pytest.mark.parametrize('name', ['MIM_vit_tiny_patch4', 'mae_vit_tiny_patch4'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_keeps_targets_and_loss_in_fp32_close_to_fp32(name, dtype):
    model = tiny(name)
    x, noise = batch()
    ref, ref_parts = model(x, 0.75, noise)
    with torch.autocast('cpu', dtype=dtype):
        if hasattr(model, 'hog'):
            assert all(t.dtype == torch.float32 for t in model.hog(x))
        loss, parts = model(x, 0.75, noise)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    # bf16 keeps 8 bits of mantissa: about 1% on these losses; fp16 much closer
    torch.testing.assert_close(loss, ref, rtol=0.02 if dtype == torch.bfloat16 else 2e-3, atol=0)


def test_a_skipped_fp16_step_keeps_the_schedule_clock(tmp_path):
    """The engine's step counter (and so every lr and FreezeOut freeze) counts optimizer steps whether or not
    the scaler applied them: an overflow at step 1 leaves the weights as they were and step 2 gets step 2's lr."""
    import json
    from engine_pretrain import train_one_epoch
    from run_pretrain import get_args_parser
    from util.freezeout import param_groups
    args = get_args_parser().parse_args(['--amp', 'none', '--epochs', '1', '--warmup_epochs', '0.5', '--lr', '1e-3',
                                         '--output_dir', str(tmp_path), '--log_every_step', '--print_freq', '100'])
    args.distributed, args.steps_per_epoch, args.total_steps, args.warmup_steps = False, 4, 4, 2
    model = tiny()
    forward = model.forward
    calls = []

    class InfGrad(torch.autograd.Function):  # a finite loss whose gradients overflow, as fp16 ones can
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float('inf')

    def overflow_at_step_1(*a, **kw):
        loss, parts = forward(*a, **kw)
        calls.append(1)
        return (InfGrad.apply(loss) if len(calls) == 2 else loss), parts

    model.forward = overflow_at_step_1
    opt = torch.optim.AdamW(param_groups(model, 0.05, per_unit=False), lr=1e-3)
    scaler = misc.LossScaler('cpu', enabled=True)
    snapshots = []
    batches = [(*batch(), 0) for _ in range(4)]
    opt.register_step_post_hook(lambda *_: snapshots.append(model.blocks[0].mlp.fc1.weight.detach().clone()))
    train_one_epoch(model, model, batches, opt, scaler, torch.device('cpu'), 0, args)
    records = [json.loads(line) for line in (tmp_path / 'steps.txt').read_text().splitlines()]
    assert [r['step'] for r in records] == [0, 1, 2, 3]
    assert [r['lrs']['rest'] for r in records] == pytest.approx([0, 5e-4, 1e-3, 5e-4])  # warm-up, then cosine
    assert len(snapshots) == 3  # AdamW ran at steps 0, 2 and 3, not at the overflowing step 1
    assert scaler.state_dict()['scale'] == 2. ** 15
