"""Research options: loss weights, all-stage taps, FreezeOut variants."""
import pytest
import torch

import models_common
import models_mim
from util.freezeout import FreezeOut
from util.lr_sched import cosine_schedule


@pytest.mark.parametrize('spec,expected', [('uniform', [1, 1, 1, 1]), ('inverse_depth', [1, 1 / 2, 1 / 3, 1 / 4]),
                                           ('4,3,2,1', [4, 3, 2, 1])])
def test_loss_weights_applied_and_logged_unweighted(spec, expected):
    model = models_mim.MIM_vit_tiny_patch4(loss_weights=spec)
    torch.manual_seed(0)
    loss, logged = model(torch.randn(2, 3, 32, 32))
    assert model.loss_weights == pytest.approx(expected)
    torch.manual_seed(0)
    out, _ = model.forward_predictions(torch.randn(2, 3, 32, 32), 0.75)
    raw = [models_common.masked_mse(*out[k]) for k in range(4)]
    assert list(logged.values()) == pytest.approx([r.item() for r in raw])  # unweighted
    assert loss.item() == pytest.approx(sum(w * r.item() for w, r in zip(expected, raw)), rel=1e-5)


def test_all_stages_one_decoder_per_block_with_scales_by_depth():
    model = models_mim.MIM_vit_tiny_patch4(all_stages=True)  # depth 6
    assert model.taps == [0, 1, 2, 3, 4, 5]
    assert model.scales == [4, 4, 2, 1, 1, 0.5]  # block b gets scale index floor(4 b / depth)
    assert len(model.decoders) == 6
    loss, logged = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert len(logged) == 6 and all(p.grad is not None for p in model.decoders.parameters())


def test_all_stages_with_freezeout_drops_frozen_decoders():
    model = models_mim.MIM_vit_tiny_patch4(all_stages=True, freeze_decoders=True)
    model.set_frozen(range(4))  # patch embedding and blocks 0-2
    assert set(model(torch.randn(2, 3, 32, 32))[1]) == {'loss_blk3_x1', 'loss_blk4_x1', 'loss_blk5_x0.5'}


def test_dont_freeze_pe_never_freezes_unit_0():
    fo = FreezeOut(num_units=7, total_steps=100, warmup_steps=5, lr=1e-3, t_0=0.5, how_scale='linear',
                   freeze_pe=False, rules='project')
    assert fo.t[0] is None and fo.t[1] == pytest.approx(0.5) and fo.t[-1] == 1
    assert all(0 not in fo.frozen_set(s) for s in range(100))
    assert fo.frozen_set(99) == {1, 2, 3, 4, 5}
    model = models_mim.MIM_vit_tiny_patch4()
    fo.update(model, 99)
    assert model.no_grad_units == 0  # the patch embedding trains: gradients flow back through frozen blocks
    loss, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is None


def test_global_lr_keeps_ordinary_schedule_until_each_unit_freezes():
    fo = FreezeOut(num_units=7, total_steps=100, warmup_steps=5, lr=1e-3, min_lr=1e-5, t_0=0.5, how_scale='linear',
                   lr_mode='global', rules='project')
    for unit in range(7):
        for step in range(100):
            ordinary = cosine_schedule(step, 100, 5, 1e-3, 1e-5)
            assert fo.unit_lr(unit, step) == pytest.approx(0. if step >= fo.freeze_steps[unit] else ordinary)


def test_library_code_raises_instead_of_exiting():
    """Only entry points exit (util.misc.run_main prints a UsageError as one line); library modules raise."""
    from conftest import REPO
    library = [REPO / 'models_mim.py', REPO / 'models_vit.py', REPO / 'engine_pretrain.py', REPO / 'engine_finetune.py',
               *(REPO / 'util').glob('*.py')]
    for path in library:
        assert 'SystemExit' not in path.read_text(), path.name
