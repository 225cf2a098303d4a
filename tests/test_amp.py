"""Mixed precision on CPU: the fp16 loss scaler's skipped steps and its checkpointed state, bf16/fp16 autocast
keeping HOG targets and losses in fp32, and AMP losses close to fp32. (fp16 matmuls are about 90x slower than
bf16 on CPUs without fp16 units, hence single forward passes here.)"""
import argparse

import pytest
import torch

import models_mim
import util.misc as misc


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
    args = argparse.Namespace(output_dir=str(tmp_path))
    misc.save_checkpoint(args, 0, 3, model, opt, scaler, 'last')
    restored = misc.LossScaler('cpu', enabled=True)
    restored.load_state_dict(misc.load_checkpoint_file(tmp_path / 'checkpoint-last.pth')['scaler'])
    assert restored.state_dict() == scaler.state_dict()
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
