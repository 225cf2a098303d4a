"""Paths only a GPU takes: fused AdamW, pinned memory, GradScaler on CUDA, bf16, nvJPEG and hardware decode.
Skipped without CUDA; scripts/gpu_check.sh runs them."""
import argparse
import json

import pytest
import torch

import models_mim
from conftest import TINY_PRETRAIN, run_script
import util.misc as misc
from util import pipeline
from util.datasets import build_pretrain_loader
from util.freezeout import FreezeOut, param_groups
from util.lr_sched import adjust_learning_rate

pytestmark = pytest.mark.cuda
CUDA = torch.device('cuda')


def tiny(**kw):
    torch.manual_seed(0)
    return models_mim.MIM_vit_tiny_patch4(**kw).to(CUDA)


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g).to(CUDA), torch.rand(n, 64, generator=g).to(CUDA)


def test_fused_adamw_follows_changing_per_group_lr():
    """The fused kernel reads each group's lr every step (FreezeOut changes them): same weights as foreach."""
    models = [tiny(), tiny()]
    opts = [torch.optim.AdamW(param_groups(m, 0.05, per_unit=True), lr=1e-3, betas=(0.9, 0.95), fused=fused)
            for m, fused in zip(models, (True, False))]
    args = argparse.Namespace(total_steps=8, warmup_steps=2, lr=1e-3, min_lr=0.)
    fo = FreezeOut(num_units=models[0].num_units, total_steps=8, warmup_steps=2, lr=1e-3, t_0=0.5, how_scale='linear',
                   rules='project')
    x, noise = batch()
    for step in range(8):
        for m, opt in zip(models, opts):
            fo.update(m, step)
            adjust_learning_rate(opt, step, args, fo)
            loss, _ = m(x, 0.75, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert len({g['lr'] for g in opts[0].param_groups}) > 2
    for a, b in zip(*(m.parameters() for m in models)):
        # a tenth of one step's lr: a kernel that missed an lr change would be off by whole steps
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_pinned_loader_batches_and_non_blocking_copy(small_data):
    args = argparse.Namespace(data_path=small_data, rank=0, world_size=1, seed=0, input_size=32, skip_bad_images=False,
                              loader='fast', batch_size=8, num_workers=2, pin_mem=True, device='cuda', repeated_aug=1,
                              masks_per_image=1, mask_sets='random',
                              stop_signals='TERM,USR1')
    _, loader, _ = build_pretrain_loader(args, 64)
    images, noise, _ = next(iter(loader))
    assert images.is_pinned() and noise.is_pinned() and images.dtype == torch.uint8
    on_gpu = pipeline.to_device(images, CUDA)
    torch.testing.assert_close(on_gpu.cpu(), pipeline.to_device(images.clone(), torch.device('cpu')))


def test_grad_scaler_skips_an_overflowing_fp16_step_on_cuda():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = misc.LossScaler('cuda', enabled=True)
    x, noise = batch()
    with torch.autocast('cuda', dtype=torch.float16):
        loss, _ = model(x, 0.75, noise)
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.state_dict()['scale']
    scaler(loss * float('inf'), opt, model.parameters())
    assert scaler.state_dict()['scale'] == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for _ in range(20):  # the run goes on: steps apply again once the scale fits fp16
        with torch.autocast('cuda', dtype=torch.float16):
            loss, _ = model(x, 0.75, noise)
        scaler(loss, opt, model.parameters())
        opt.zero_grad(set_to_none=True)
        if not all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
            break
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_keeps_hog_and_loss_in_fp32_and_close_to_fp32(dtype):
    model = tiny()
    x, noise = batch()
    ref, _ = model(x, 0.75, noise)
    with torch.autocast('cuda', dtype=dtype):
        targets = model.hog(x)
        loss, _ = model(x, 0.75, noise)
    assert all(t.dtype == torch.float32 for t in targets) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0.03, atol=0)


def test_device_loader_decodes_on_cuda_like_on_cpu(tmp_path):
    from bench.bench_data import make_jpegs
    make_jpegs(tmp_path, per_class=1)
    from util.datasets import image_folder
    data = pipeline.CropSamples(image_folder(tmp_path, 'train', None), 0, 224, loader='device')
    encoded, _, _ = pipeline.collate([data[(0, i)] for i in range(len(data))])
    gpu = pipeline.to_device(encoded, CUDA, 224)
    cpu = pipeline.to_device(encoded, torch.device('cpu'), 224)
    levels = (gpu.cpu() - cpu).abs() * 255 * 0.225
    # nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling: about 1.5 levels on average on these
    # grainy photos, more on single pixels
    assert gpu.shape == (10, 3, 224, 224) and levels.mean() < 3 and (levels > 16).float().mean() < 0.01


def test_hw_loader_decodes_crop_boxes_on_the_hardware_decoder_like_on_cpu(tmp_path):
    """The hardware decoder's crop boxes against the CPU backend's (the nvJPEG-vs-libjpeg tolerance); a
    progressive JPEG, which the hardware decoder refuses, is decoded by nvJPEG and counted."""
    pytest.importorskip('nvidia.nvimgcodec')
    from PIL import Image
    from bench.bench_data import make_jpegs
    from util.datasets import image_folder
    make_jpegs(tmp_path, per_class=1)
    first = sorted((tmp_path / 'train').rglob('*.JPEG'))[0]
    Image.open(first).save(first.with_name('progressive.jpg'), quality=90, progressive=True)
    data = pipeline.CropSamples(image_folder(tmp_path, 'train', None), 0, 224, loader='hw')
    encoded, _, _ = pipeline.collate([data[(0, i)] for i in range(len(data))])
    pipeline.hardware_decoder(CUDA).take_counts()
    gpu = pipeline.to_device(encoded, CUDA, 224)
    counts = pipeline.hardware_decoder(CUDA).take_counts()
    cpu = pipeline.to_device(encoded, torch.device('cpu'), 224)
    levels = (gpu.cpu() - cpu).abs() * 255 * 0.225
    assert gpu.shape == (11, 3, 224, 224) and levels.mean() < 3 and (levels > 16).float().mean() < 0.01
    assert counts == {'hardware': 10, 'refused': 1, 'in_workers': 0}, counts


@pytest.mark.parametrize('pos_embed', ['sincos', 'rope'])
def test_grad_ckpt_under_bf16_gives_the_gradients_of_the_plain_step(pos_embed):
    """--grad_ckpt recomputes the trainable blocks in backward: on CUDA under bf16 autocast too, with either position
    embedding and a frozen prefix, the gradients are those of the plain step (to 1% of each tensor's norm)."""
    x, noise = batch()
    grads = []
    for ckpt in (False, True):
        model = tiny(grad_ckpt=ckpt, pos_embed=pos_embed)
        model.set_frozen(range(2))
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss, _ = model(x, 0.75, noise)
        loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, ref in grads[0].items():
        assert (grads[1][name] - ref).norm() <= 0.01 * ref.norm() + 1e-8, name


def test_cuda_graph_run_follows_the_compiled_run_through_freeze_events(tmp_path, small_data):
    """--compile reduce-overhead replays the compiled step as CUDA graphs, captured anew at each FreezeOut event
    (project rules: two units at step 3, two at step 4): the losses of the default-mode compiled run (block by block,
    the default with --freezeout), and no part of the step left out of the graphs."""
    common = [*TINY_PRETRAIN, '--data_path', small_data, '--device', 'cuda', '--amp', 'bf16', '--epochs', '1',
              '--warmup_epochs', '0.2', '--log_every_step', '--freezeout', '--freezeout_rules', 'project',
              '--how_scale', 'cubic', '--t_0', '0.8']
    losses = []
    for mode in ('default', 'reduce-overhead'):
        proc = run_script('run_pretrain.py', *common, '--compile', mode, '--output_dir', tmp_path / mode,
                          env={'TORCH_LOGS': 'perf_hints'}, timeout=600)
        output = proc.stdout + proc.stderr
        assert output.count('unit(s) frozen from step') == 2 and 'skipping cudagraphs' not in output, output[-3000:]
        losses.append([json.loads(line)['loss'] for line in (tmp_path / mode / 'steps.txt').read_text().splitlines()])
    assert len(losses[0]) == 5
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
