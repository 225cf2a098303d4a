"""LocalMIM on Swin: the loss and gradients of Haoqing-Wang/LocalMIM's MaskedAutoencoderSwin, written out
below from its definition in plain tensor code on its own parameter names (one sample at a time, the visible
tokens of each window attending to each other with the -100 cross-window mask, its patch merging order, its
decoders on the unit-major token order, its per-channel HOG layers), against our model loaded from that layout;
masks off the last-stage grid; timm loading of the exported encoder."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models_common
import models_mim
import models_swin
import models_vit
from conftest import run_script
from util.errors import UsageError

SOBEL = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
# a 4-stage Swin small enough for CPU: grids 32, 16, 8, 4 (window 4 clamps at the last), 4x4 mask units
SMALL4 = dict(img_size=64, patch_size=2, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4), window_size=4,
              decoder_dim=32, decoder_heads=2)


def to_original_layout(model):
    """Our state dict in Haoqing-Wang/LocalMIM's names: encoder.*, patch merging at the end of the previous stage
    in its concatenation order, encoder.norm.<k>, decoder.<k>.blocks.0, hog_enc.<k>.conv."""
    out = {}
    for k, v in model.state_dict().items():
        p = k.split('.')
        if p[0] == 'layers' and p[2] == 'downsample':
            a, b, c, d = v.split(v.shape[-1] // 4, dim=-1)
            out['.'.join(['encoder.layers', str(int(p[1]) - 1), *p[2:]])] = torch.cat([a, c, b, d], -1)
        elif p[0] in ('patch_embed', 'layers'):
            out['encoder.' + k] = v
        elif p[0] == 'tap_norms':
            out['.'.join(['encoder.norm', *p[1:]])] = v
        elif p[0] == 'decoders':
            rest = ['blocks', '0', *p[3:]] if p[2] == 'block' else p[2:]
            out['.'.join(['decoder', p[1], *rest])] = v
    for k in range(len(model.decoders)):
        if model.hog is not None:
            out[f'hog_enc.{k}.conv.weight'] = torch.stack([SOBEL, SOBEL.t()])[:, None]
            if model.hog.grad_bias is not None:
                out[f'hog_enc.{k}.conv.bias'] = model.hog.grad_bias[k].clone()
    return out


def ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + '.weight'], sd[name + '.bias'], 1e-6)


def lin(x, sd, name):
    return F.linear(x, sd[name + '.weight'], sd.get(name + '.bias'))


def attention(x, sd, name, heads, bias):
    """Multi-head self-attention of x (N, C) with an additive (heads, N, N) bias."""
    N, C = x.shape
    q, k, v = lin(x, sd, name + '.qkv').view(N, 3, heads, C // heads).permute(1, 2, 0, 3)
    a = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1) + bias
    return lin((a.softmax(-1) @ v).transpose(0, 1).reshape(N, C), sd, name + '.proj')


def block(x, sd, name, heads, bias):
    x = x + attention(ln(x, sd, name + '.norm1'), sd, name + '.attn', heads, bias)
    return x + lin(F.gelu(lin(ln(x, sd, name + '.norm2'), sd, name + '.mlp.fc1')), sd, name + '.mlp.fc2')


def reference_hog(img, nbins, cell, bias):
    """Its HOGLayer on each colour channel of one (3, H, W) image: (cells, 3*nbins)."""
    hists = []
    for c in range(3):
        g = F.conv2d(F.pad(img[None, c:c + 1], (1, 1, 1, 1), mode='reflect'),
                     torch.stack([SOBEL, SOBEL.t()])[:, None], bias)[0]
        phase = torch.atan2(g[0], g[1])
        bins = torch.floor(phase / math.pi * nbins).long() % nbins
        votes = torch.zeros(nbins, *g.shape[1:]).scatter_(0, bins[None], g.norm(dim=0)[None])
        hists.append(F.normalize(F.avg_pool2d(votes[None], cell)[0], dim=0))
    return torch.cat(hists).flatten(1).t()


def reference_loss(sd, imgs, masked_units, cfg, original_coords=False):
    """Its loss for images (B, 3, H, W) and per-sample unit masks (B, M*M) (True = masked, raster order)."""
    S, p = len(cfg['depths']), cfg['patch_size']
    G = cfg['img_size'] // p
    M = G >> (S - 1)
    num, den = [0.] * S, [0.] * S
    for b in range(imgs.shape[0]):
        x = F.conv2d(imgs[b:b + 1], sd['encoder.patch_embed.proj.weight'], sd['encoder.patch_embed.proj.bias'],
                     stride=p).flatten(2)[0].t()
        x = ln(x, sd, 'encoder.patch_embed.norm')
        r = G // M
        tok_mask = masked_units[b].view(M, 1, M, 1).expand(M, r, M, r).reshape(-1)
        rows, cols = torch.meshgrid(torch.arange(G), torch.arange(G), indexing='ij')
        coords = torch.stack([rows, cols], -1).reshape(-1, 2)

        def unit_major(t):
            return t.view(M, r, M, r, *t.shape[1:]).transpose(1, 2).reshape(G * G, *t.shape[1:])
        vis = ~unit_major(tok_mask)
        x, coords = unit_major(x)[vis], unit_major(coords)[vis]
        latents, vis_masks = [], []
        for i in range(S):
            res = G >> i
            win, shift = (res, 0) if res <= cfg['window_size'] else (cfg['window_size'], cfg['window_size'] // 2)
            heads = cfg['num_heads'][i]
            for j in range(cfg['depths'][i]):
                sh = 0 if j % 2 == 0 else shift
                gid = (coords + (win - sh) % win) // win
                cross = (gid[:, None] != gid[None]).any(-1)
                d = coords[:, None] - coords[None] + win - 1
                idx = (d[..., 0] * (2 * win - 1) + d[..., 1]).masked_fill(cross, 0)
                table = sd[f'encoder.layers.{i}.blocks.{j}.attn.relative_position_bias_table']
                bias = (table[idx] * (~cross)[..., None]).permute(2, 0, 1) + cross.float() * -100.
                x = block(x, sd, f'encoder.layers.{i}.blocks.{j}', heads, bias)
            if i < S - 1:  # merge 2x2 tokens inside each unit, concatenated row-major
                r = res // M
                C = x.shape[-1]
                x = x.view(-1, r // 2, 2, r // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4 * C)
                x = lin(ln(x, sd, f'encoder.layers.{i}.downsample.norm'), sd, f'encoder.layers.{i}.downsample.reduction')
                vis = vis.view(-1, r // 2, 2, r // 2, 2).any(4).any(2).reshape(-1)
                if original_coords:  # raster coordinates read at the unit-major positions
                    rows, cols = torch.meshgrid(torch.arange(res // 2), torch.arange(res // 2), indexing='ij')
                    coords = torch.stack([rows, cols], -1).reshape(-1, 2)[vis]
                else:
                    coords = coords.view(-1, r // 2, 2, r // 2, 2, 2)[:, :, 0, :, 0] // 2
                    coords = coords.reshape(-1, 2)
            latents.append(ln(x, sd, f'encoder.norm.{i}'))
            vis_masks.append(vis)
        for k in range(S):  # decoders on the unit-major grid, reordered to raster
            dec = f'decoder.{k}'
            h = lin(latents[k], sd, dec + '.embed')
            L = vis_masks[k].numel()
            full = sd[dec + '.mask_token'][0].expand(L, -1).clone()
            full[vis_masks[k]] = h
            w = int(math.isqrt(L)) // M
            full = full.view(M, M, w, w, -1).transpose(1, 2).reshape(L, -1) + sd[dec + '.pos_embed'][0]
            heads = cfg['decoder_heads']
            full = block(full, sd, dec + '.blocks.0', heads, 0.)
            pred = lin(ln(full, sd, dec + '.norm'), sd, dec + '.pred')
            cell = cfg['img_size'] // int(math.isqrt(L))
            target = reference_hog(imgs[b], cfg['hog_nbins'], cell, sd.get(f'hog_enc.{k}.conv.bias'))
            weight = masked_units[b].view(M, 1, M, 1).expand(M, w, M, w).reshape(-1).float()
            num[k] = num[k] + (((pred - target) ** 2).mean(-1) * weight).sum()
            den[k] = den[k] + weight.sum()
    return sum(n / d for n, d in zip(num, den))


def masked_units_from_noise(noise, mask_ratio):
    keep = int(noise.shape[1] * (1 - mask_ratio))
    masked = torch.ones_like(noise, dtype=torch.bool)
    masked.scatter_(1, noise.argsort(1)[:, :keep], False)
    return masked


# tiny at ratio 0.5 attends through padded windows at its first stage, the others through masked pairs
@pytest.mark.parametrize('cfg_name,hog_bias,original_coords,ratio', [
    ('tiny', False, False, 0.75), ('tiny', True, True, 0.75), ('small4', False, False, 0.75),
    ('small4', False, True, 0.75), ('tiny', False, False, 0.5), ('tiny', False, True, 0.5)])
def test_loss_and_gradients_equal_the_original_definition(cfg_name, hog_bias, original_coords, ratio):
    if cfg_name == 'tiny':
        cfg = dict(img_size=32, patch_size=2, depths=(2, 2, 2), num_heads=(3, 6, 12), window_size=4,
                   decoder_heads=4, hog_nbins=9)

        def make():
            return models_swin.MIM_swin_tiny_patch2_win4(hog_bias=hog_bias, original_merged_coords=original_coords)
    else:
        cfg = dict(SMALL4, hog_nbins=9)

        def make():
            return models_swin.LocalMIMSwin(**SMALL4, hog_bias=hog_bias, original_merged_coords=original_coords)
    torch.manual_seed(0)
    model = make()
    for p in model.parameters():  # away from the initialisation's zeros and ones
        p.data.add_(torch.randn_like(p) * 0.05)
    if hog_bias:  # as if drawn by the original run
        model.hog.grad_bias.uniform_(-1 / 3, 1 / 3)
    sd = {k: v.clone().requires_grad_(v.is_floating_point() and not k.endswith('pos_embed'))
          for k, v in to_original_layout(model).items()}
    ours = make()  # other weights, replaced by the original-layout ones
    models_mim.load_weights(ours, {k: v.detach() for k, v in sd.items()})
    imgs = torch.randn(3, 3, cfg['img_size'], cfg['img_size'])
    noise = torch.rand(3, ours.num_mask_units)
    loss, _ = ours(imgs, ratio, noise)
    ref = reference_loss(sd, imgs, masked_units_from_noise(noise, ratio), cfg, original_coords)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    ref_grads = models_swin.from_localmim_swin_layout(
        {k: v.grad for k, v in sd.items() if v.grad is not None})[0]
    grads = {k: p.grad for k, p in ours.named_parameters()}
    assert set(ref_grads) == set(grads)
    for k, g in grads.items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def raster_tokens(feat, ids_keep, mask_grid, unit):
    """Our visible tokens (B, K*u*u, C) with all units kept -> (B, g, g, C) in raster order."""
    B, _, C = feat.shape
    M = mask_grid
    x = feat.view(B, M, M, unit, unit, C)
    assert torch.equal(ids_keep, torch.arange(M * M).expand(B, -1))
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, M * unit, M * unit, C)


@pytest.mark.parametrize('kwargs', [{}, SMALL4])
def test_unmasked_encoder_equals_timm_swin_at_every_stage(kwargs):
    """With nothing masked, the sparse window attention is timm's dense shifted-window attention."""
    torch.manual_seed(0)
    model = models_swin.LocalMIMSwin(**kwargs) if kwargs else models_swin.MIM_swin_tiny_patch2_win4()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    timm_swin = timm.models.swin_transformer.SwinTransformer(
        img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.stage_dims[0], depths=model.depths,
        num_heads=[s.blocks[0].attn.num_heads for s in model.layers],
        window_size=model.layers[0].blocks[0].attn.window_size[0], num_classes=0,
        norm_layer=models_common.LayerNorm).eval()
    timm_swin.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(('patch_embed', 'layers'))},
                              strict=False)
    imgs = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        feats, ids_keep, mask = model.forward_encoder(imgs, 0.)
        assert mask.sum() == 0
        x = timm_swin.patch_embed(imgs)
        expected = []
        for i, stage in enumerate(timm_swin.layers):
            x = stage(x)
            if i + 1 < len(timm_swin.layers):
                expected.append(timm_swin.layers[i + 1].downsample(x))
        expected.append(x)
    for k, (feat, exp) in enumerate(zip(feats, expected)):
        unit = exp.shape[1] // model.mask_grid
        torch.testing.assert_close(raster_tokens(feat, ids_keep, model.mask_grid, unit), exp, rtol=1e-4, atol=1e-5)


def test_masks_are_whole_last_stage_units_per_sample_or_shared():
    torch.manual_seed(0)
    model = models_swin.MIM_swin_tiny_patch2_win4()
    out, mask = model.forward_predictions(torch.randn(4, 3, 32, 32), 0.75)
    assert mask.shape == (4, 16) and (mask.sum(1) == 12).all()  # int(16 * 0.25) = 4 units kept
    assert len({tuple(m.tolist()) for m in mask}) > 1  # one mask per sample
    for k, (pred, target, weight) in out.items():  # each tap's cells: the units' masks expanded
        g = math.isqrt(weight.shape[1])
        assert pred.shape[:2] == target.shape[:2] == weight.shape
        expanded = mask.view(4, 4, 1, 4, 1).expand(-1, -1, g // 4, -1, g // 4).reshape(4, -1)
        assert torch.equal(weight, expanded)
    shared = models_swin.MIM_swin_tiny_patch2_win4(shared_mask=True)
    _, mask = shared.forward_predictions(torch.randn(4, 3, 32, 32), 0.75)
    assert (mask == mask[:1]).all()


def test_masked_units_cost_no_encoder_compute():
    """Swin-B at 224 px: encoder FLOPs at mask ratio 0.75 at most 35% of timm's dense windowed encoder (what
    an encoder that keeps the masked tokens costs); with nothing masked, exactly the dense encoder's."""
    model = models_swin.MIM_swin_base_patch4_win7()
    dense = timm.models.swin_transformer.SwinTransformer(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                                         window_size=7, num_classes=0)
    imgs = torch.randn(1, 3, 224, 224)
    flops = {}
    for name, run in (('dense', lambda: dense.forward_features(imgs)),
                      (0., lambda: model.forward_encoder(imgs, 0.)), (0.75, lambda: model.forward_encoder(imgs, 0.75))):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run()  # attention as matmuls: the counter has no formula for the CPU's fused kernel
        flops[name] = counter.get_total_flops()
    assert flops[0.] == flops['dense']
    assert flops[0.75] <= 0.35 * flops['dense']


def test_released_swin_layout_loads_and_exports_to_timm(tmp_path, capsys):
    """A Haoqing-Wang/LocalMIM Swin checkpoint (its names, its merge order) -> our model with the same loss ->
    export -> timm's SwinTransformer, strictly, with the features of our encoder."""
    torch.manual_seed(0)
    model = models_swin.MIM_swin_tiny_patch2_win4(hog_bias=True)
    model.hog.grad_bias.uniform_(-1 / 3, 1 / 3)
    original = to_original_layout(model)
    original['encoder.layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(16, 16, dtype=torch.long)
    path = tmp_path / 'released.pth'
    args = {'model': 'MIM_swin_tiny_patch2_win4', 'input_size': 32, 'hog_bias': True}
    torch.save({'model': original, 'args': args}, path)
    loaded = models_mim.build(models_mim.saved_args(torch.load(path)))
    models_mim.load_weights(loaded, original)
    assert 'newly initialised' not in capsys.readouterr().out
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.testing.assert_close(loaded(imgs, 0.75, noise)[0], model(imgs, 0.75, noise)[0], rtol=0, atol=0)
    # our checkpoint keeps the loaded HOG biases
    resaved = models_swin.MIM_swin_tiny_patch2_win4(hog_bias=True)
    resaved.load_state_dict(loaded.state_dict())
    assert torch.equal(resaved.hog.grad_bias, model.hog.grad_bias)

    from tools.export_timm import export
    state = export(path, tmp_path / 'encoder.pth')
    timm_swin = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), window_size=4,
        num_classes=0, norm_layer=models_common.LayerNorm).eval()
    timm_swin.load_state_dict(torch.load(tmp_path / 'encoder.pth'), strict=True)
    with torch.no_grad():
        feats, ids_keep, _ = model.forward_encoder(imgs, 0.)
        ours = raster_tokens(model.tap_norms[-1](feats[-1]), ids_keep, 4, 1)
        torch.testing.assert_close(timm_swin.forward_features(imgs), ours, rtol=1e-4, atol=1e-5)
    encoder = models_vit.load_encoder(str(path))
    torch.testing.assert_close(models_vit.embed(encoder, imgs.sigmoid(), pool='mean').shape, torch.Size([2, 192]))
    assert set(state) == set(timm_swin.state_dict())


def test_fastmim_swin_pretrains_with_windows_of_4_at_128_px_and_fine_tunes_with_another_window(tmp_path, capsys):
    """FastMIM's Swin-B: windows of 4 tile its 128 px grids (32, 16, 8, 4), windows of 7 do not; a classifier with
    another window takes the checkpoint's relative position bias tables resized by timm's interpolation (the tiny
    model here: windows of 4 at 32 px, fine-tuned with windows of 8 at 64 px)."""
    from run_pretrain import check_args, get_args_parser
    with torch.device('meta'):
        assert models_mim.build(get_args_parser().parse_args(['--model', 'MIM_swin_base_patch4_win4'])).num_mask_units == 16
    with pytest.raises(UsageError, match='do not tile'):
        check_args(get_args_parser().parse_args(['--model', 'MIM_swin_base_patch4_win4', '--input_size_schedule',
                                                 '128:0.5,224']))
    torch.manual_seed(0)
    model = models_swin.MIM_swin_tiny_patch2_win4()
    table = model.layers[1].blocks[0].attn.relative_position_bias_table  # (7 * 7, heads)
    with torch.no_grad():
        table.copy_(torch.arange(table.shape[1], dtype=torch.float).expand_as(table))  # one value per head
    torch.save({'model': model.state_dict(), 'args': {'model': 'MIM_swin_tiny_patch2_win4', 'input_size': 32}},
               tmp_path / 'win4.pth')
    classifier = models_vit.swin_tiny_patch2_win4(num_classes=10, img_size=64, window_size=8)
    models_vit.load_pretrained(classifier, tmp_path / 'win4.pth')
    assert 'Resized 6 relative position bias tables to windows of 8' in capsys.readouterr().out
    resized = classifier.layers[1].blocks[0].attn.relative_position_bias_table
    assert resized.shape == (15 * 15, table.shape[1])
    torch.testing.assert_close(resized, torch.arange(table.shape[1], dtype=torch.float).expand_as(resized))
    assert torch.equal(classifier.layers[1].blocks[0].attn.qkv.weight, model.layers[1].blocks[0].attn.qkv.weight)
    assert classifier(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_swin_layer_decay_is_the_original_rule():
    model = models_vit.swin_base_patch4_win7(num_classes=10)
    layer_of = model.group_matcher()
    assert layer_of('patch_embed.proj.weight') == 0
    assert layer_of('layers.0.blocks.1.attn.qkv.weight') == 2
    assert layer_of('layers.1.downsample.reduction.weight') == 2  # closes stage 0 in the original's layout
    assert layer_of('layers.2.blocks.0.norm1.weight') == 5
    assert layer_of('layers.3.downsample.norm.weight') == 22
    assert layer_of('norm.weight') == layer_of('head.fc.weight') == 25
    from run_finetune import layer_decay_groups
    scales = {id(p): g['lr_scale'] for g in layer_decay_groups(model, 0.05, 0.9) for p in g['params']}
    named = dict(model.named_parameters())
    assert scales[id(named['patch_embed.proj.weight'])] == pytest.approx(0.9 ** 25)
    assert scales[id(named['layers.1.downsample.reduction.weight'])] == pytest.approx(0.9 ** 23)
    assert scales[id(named['head.fc.weight'])] == 1.0
    decayed = {id(p) for g in layer_decay_groups(model, 0.05, 0.9) if g['weight_decay'] for p in g['params']}
    assert id(named['layers.0.blocks.0.attn.relative_position_bias_table']) in decayed


def test_swin_refuses_options_it_does_not_have():
    import run_pretrain
    parser = run_pretrain.get_args_parser()
    for extra, message in ((['--freezeout'], '--freezeout applies to the ViT models'),
                           (['--pos_embed', 'rope'], '--pos_embed applies to the ViT models'),
                           (['--norm_pix_loss'], 'pass --target pixel')):
        args = parser.parse_args(['--model', 'MIM_swin_tiny_patch2_win4', '--input_size', '32', *extra])
        with pytest.raises(UsageError, match=message):
            models_mim.build(args)
    args = parser.parse_args(['--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--target', 'pixel'])
    with pytest.raises(UsageError, match='--target applies to LocalMIM on Swin'):
        models_mim.build(args)
    for size, message in (('36', 'does not halve'), ('40', 'windows do not tile')):
        args = parser.parse_args(['--model', 'MIM_swin_tiny_patch2_win4', '--input_size', size])
        with pytest.raises(UsageError, match=message):
            models_mim.build(args)


@pytest.mark.slow
def test_swin_pretrains_resumes_fine_tunes_probes_and_draws(tmp_path, small_data):
    pre = ['--model', 'MIM_swin_tiny_patch2_win4', '--input_size', '32', '--batch_size', '16', '--num_workers', '0',
           '--warmup_epochs', '0.5', '--data_path', small_data, '--output_dir', tmp_path / 'pre']
    run_script('run_pretrain.py', *pre, '--epochs', '1', '--hog_bias')
    ckpt = tmp_path / 'pre' / 'checkpoint-last.pth'
    assert 'hog.grad_bias' in torch.load(ckpt)['model']
    run_script('run_pretrain.py', *pre, '--epochs', '2', '--hog_bias', '--new_recipe')  # resumes, one epoch longer
    ft = ['--model', 'swin_tiny_patch2_win4', '--input_size', '32', '--batch_size', '16', '--num_workers', '0',
          '--data_path', small_data, '--finetune', ckpt, '--epochs', '1', '--warmup_epochs', '0.5']
    run_script('run_finetune.py', *ft, '--layer_decay', '0.9', '--output_dir', tmp_path / 'ft')
    run_script('run_linprobe.py', *ft, '--global_pool', '--output_dir', tmp_path / 'lp')
    proc = run_script('run_knn.py', *ft[:-4], '--global_pool', '--output_dir', tmp_path / 'knn')
    assert 'kNN' in proc.stdout
    run_script('visualize.py', '--checkpoint', ckpt, '--data_path', small_data, '--num_images', '1',
               '--output_dir', tmp_path / 'vis')
    assert len(list((tmp_path / 'vis').glob('*.png'))) == 1
