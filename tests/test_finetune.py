"""Fine-tuning, linear probing and export: models_vit, checkpoint loading, CLI runs, distributed eval."""
import argparse
import functools

import pytest
import timm
import torch

import models_vit
from conftest import free_port, run_script
from util import metrics
from tools.export_timm import export

FT = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '16', '--num_workers', '0',
      '--warmup_epochs', '0.5', '--print_freq', '5']


def timm_tiny(**kw):
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=4, depth=6, **kw)


@pytest.mark.parametrize('global_pool', [True, False])
def test_layer_decay_groups_follow_beit_rule(global_pool):
    """facebookresearch/mae's rule: tokens and patch embedding at layer 0, block i at i+1, everything after the
    blocks (fc_norm, or the final norm with --cls_token, and the head) at scale 1."""
    from run_finetune import layer_decay_groups
    model = models_vit.vit_tiny_patch4(num_classes=10, global_pool=global_pool)
    groups = layer_decay_groups(model, 0.05, 0.5)
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    num_layers = len(model.blocks) + 1
    for g in groups:
        for p in g['params']:
            n = names[id(p)]
            layer = 0 if n.startswith(('cls_token', 'pos_embed', 'patch_embed')) else \
                int(n.split('.')[1]) + 1 if n.startswith('blocks.') else num_layers
            assert g['lr_scale'] == pytest.approx(0.5 ** (num_layers - layer)), n
            assert g['weight_decay'] == (0 if p.ndim == 1 or n in ('cls_token', 'pos_embed') else 0.05), n


def test_localmim_checkpoint_loads_with_exactly_the_expected_missing_keys(pretrain_ckpt):
    gp = models_vit.vit_tiny_patch4(num_classes=10)
    assert models_vit.load_pretrained(gp, pretrain_ckpt) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    cls = models_vit.vit_tiny_patch4(num_classes=10, global_pool=False)
    assert models_vit.load_pretrained(cls, pretrain_ckpt) == ['head.bias', 'head.weight']
    saved = torch.load(pretrain_ckpt)['model']
    assert torch.equal(cls.norm.weight, saved['tap_norms.3.weight'])  # the last tap's norm reads the final block
    assert torch.equal(cls.blocks[5].mlp.fc2.weight, saved['blocks.5.mlp.fc2.weight'])


def test_pos_embed_interpolated_from_32_to_64_pixels(pretrain_ckpt):
    model = models_vit.vit_tiny_patch4(img_size=64, num_classes=10)
    models_vit.load_pretrained(model, pretrain_ckpt)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 192)
    saved = torch.load(pretrain_ckpt)['model']['pos_embed']
    assert torch.equal(model.pos_embed[:, 0], saved[:, 0])  # cls position kept as is


def test_wrong_architecture_is_a_clear_error(pretrain_ckpt):
    with pytest.raises(ValueError, match='does not fit this classifier.*patch_embed.proj.weight'):
        models_vit.load_pretrained(models_vit.vit_tiny_patch8(num_classes=10), pretrain_ckpt)


@pytest.mark.parametrize('global_pool', [True, False])
def test_state_dict_loads_into_timm_with_identical_logits(global_pool):
    ours = models_vit.vit_tiny_patch4(num_classes=7, global_pool=global_pool).eval()
    theirs = timm_tiny(num_classes=7, global_pool='avg' if global_pool else 'token').eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x), theirs(x))


def test_base_loads_into_timm_by_its_registered_name():
    ours = models_vit.vit_base_patch16(num_classes=5)
    timm.create_model('vit_base_patch16_224', num_classes=5, global_pool='avg').load_state_dict(
        ours.state_dict(), strict=True)


def test_export_round_trip_into_timm(pretrain_ckpt, tmp_path):
    state = export(pretrain_ckpt, tmp_path / 'enc.safetensors')
    from safetensors.torch import load_file
    model = timm_tiny(num_classes=0, global_pool='token').eval()
    model.load_state_dict(load_file(str(tmp_path / 'enc.safetensors')), strict=True)
    ours = models_vit.vit_tiny_patch4(num_classes=0, global_pool=False).eval()
    ours.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), ours(x))


def best_log(out):
    return metrics.read_json_lines(out / 'log.txt')


@pytest.mark.slow
def test_finetune_cli_with_mixup_then_eval_reproduces_best(tmp_path, small_data, pretrain_ckpt):
    out = tmp_path / 'ft'
    run_script('run_finetune.py', *FT, '--data_path', small_data, '--finetune', pretrain_ckpt, '--epochs', '2',
               '--mixup', '0.8', '--cutmix', '1.0', '--output_dir', out)
    log = best_log(out)
    assert len(log) == 2 and 0 <= log[-1]['test_acc1'] <= 100
    best = torch.load(out / 'checkpoint-best.pth')
    assert best['best_acc1'] == max(r['test_acc1'] for r in log)
    proc = run_script('run_finetune.py', *FT, '--data_path', small_data, '--eval', '--resume',
                      out / 'checkpoint-best.pth', '--output_dir', tmp_path / 'eval')
    assert f"Acc@1 {best['test_stats']['acc1']:.3f}" in proc.stdout
    [kept] = best_log(tmp_path / 'eval')  # --eval keeps its result in log.txt
    assert kept['eval_of'] == str(out / 'checkpoint-best.pth')
    assert kept == pytest.approx({'eval_of': kept['eval_of'],
                                  **{f'test_{k}': v for k, v in best['test_stats'].items()}}, abs=1e-3)

    # --dist_eval over 2 gloo processes: summed shards give exactly the single-process accuracy
    dist = run_script('-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_finetune.py', *FT, '--data_path',
                      small_data, '--eval', '--dist_eval', '--resume', out / 'checkpoint-best.pth', '--output_dir',
                      tmp_path / 'eval2')
    assert f"Acc@1 {best['test_stats']['acc1']:.3f}" in dist.stdout and '(40 images)' in dist.stdout


@pytest.mark.slow
def test_finetune_and_linprobe_on_embedded_data(tmp_path, pretrain_ckpt):
    run_script('run_finetune.py', *FT, '--finetune', pretrain_ckpt, '--epochs', '1', '--batch_size', '64',
               '--output_dir', tmp_path / 'ft')
    assert best_log(tmp_path / 'ft')[0]['test_images'] == 300
    proc = run_script('run_linprobe.py', *FT, '--finetune', pretrain_ckpt, '--epochs', '1', '--batch_size', '128',
                      '--output_dir', tmp_path / 'lp')
    assert best_log(tmp_path / 'lp')[0]['test_images'] == 300
    assert 'newly initialised: []' in proc.stdout  # probe on the cls token after the pre-trained final norm


def test_linear_probe_trains_only_the_head(pretrain_ckpt):
    encoder = models_vit.vit_tiny_patch4(num_classes=0, global_pool=False)
    models_vit.load_pretrained(encoder, pretrain_ckpt)
    probe = models_vit.LinearProbe(encoder, 10).train()
    assert not probe.encoder.training and probe.head.training
    probe(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in probe.encoder.parameters())
    assert probe.head[1].weight.grad is not None


def test_too_few_nb_classes_is_a_clear_error(tmp_path, small_data):
    proc = run_script('run_finetune.py', *FT, '--data_path', small_data, '--nb_classes', '5', '--output_dir',
                      tmp_path, check=False)
    assert proc.returncode != 0
    assert '--nb_classes 5 is smaller than the 10 classes found' in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_two_process_probe_saves_the_statistics_it_was_evaluated_with(tmp_path, small_data, pretrain_ckpt):
    """Each rank's BatchNorm sees its own batches; before evaluating, rank 0's statistics go to every rank, so
    the sharded accuracy in log.txt is what the saved checkpoint gives on re-evaluation."""
    out = tmp_path / 'lp'
    run_script('-m', 'torch.distributed.launch', '--nproc_per_node=2', 'run_linprobe.py',
               *FT, '--finetune', pretrain_ckpt, '--data_path', small_data, '--epochs', '2', '--batch_size', '8',
               '--blr', '20', '--dist_eval', '--output_dir', out)
    logged = best_log(out)[-1]
    again = run_script('run_linprobe.py', *FT, '--data_path', small_data, '--eval', '--resume',
                       out / 'checkpoint-last.pth', '--output_dir', tmp_path / 'eval')
    assert f"Acc@1 {logged['test_acc1']:.3f}" in again.stdout and f"loss {logged['test_loss']:.3f}" in again.stdout


def _buffers_worker(rank, port, out):
    import warnings
    import torch.distributed as dist
    from util import distributed
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False), torch.nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no deprecation warning at each wrapper (each FreezeOut event)
        ddp = distributed.wrap_ddp(model, argparse.Namespace(distributed=True, device='cpu', gpu=0))
    ddp(torch.randn(8, 4) + rank * 10)  # each rank's own running statistics, not synced by the forward
    local = model[0].running_mean.clone()
    distributed.broadcast_buffers(model)
    torch.save({'local': local, **{k: v.clone() for k, v in model[0].state_dict().items()}}, f'{out}/rank{rank}.pth')
    del ddp  # as the entry points do: a wrapper that outlives the group can hang the exit (distributed.finish)
    distributed.finish()


def test_ddp_keeps_buffers_rank_local_until_broadcast_gives_every_rank_rank0s(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_buffers_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f'rank{r}.pth') for r in range(2))
    assert (b['local'] - a['local']).abs().min() > 0.5  # rank 1's inputs are shifted by 10
    assert all(torch.equal(a[k], b[k]) for k in a if k != 'local') and a['running_mean'].abs().max() < 5


def test_embedding_api_docstring_and_pil_input(pretrain_ckpt):
    import doctest
    from PIL import Image
    assert doctest.testmod(models_vit, raise_on_error=False).failed == 0
    encoder = models_vit.load_encoder(pretrain_ckpt)
    photos = [Image.new('RGB', (50, 40), (200, 30, 30)), Image.new('RGB', (40, 60), (30, 30, 200))]
    feats = models_vit.embed(encoder, photos, pool='mean')
    assert feats.shape == (2, 192) and not torch.allclose(feats[0], feats[1])
    tensor = torch.stack([torch.tensor([200 / 255, 30 / 255, 30 / 255])[:, None, None].expand(3, 32, 32)] * 2)
    torch.testing.assert_close(models_vit.embed(encoder, tensor)[0], models_vit.embed(encoder, tensor)[1])
    with pytest.raises(ValueError, match="pool must be"):
        models_vit.embed(encoder, tensor, pool='max')


@pytest.mark.parametrize('build', [dict(layer_scale=1e-5), dict(pos_embed='rope'),
                                   dict(layer_scale=1e-5, pos_embed='rope')])
def test_export_prints_the_timm_model_that_loads_it_strictly(tmp_path, capsys, build):
    """LayerScale and rotary position embeddings come from the checkpoint: the export's printed timm constructor
    (create_model, or timm's Eva for rope) loads the state dict strictly and computes our encoder's features."""
    import models_mim
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save({'model': models_mim.MIM_vit_tiny_patch4(**build).state_dict(),
                'args': {'model': 'MIM_vit_tiny_patch4', 'input_size': 32, **build}}, ckpt)
    expected = {'init_values': 1e-5} if 'layer_scale' in build else {}
    expected.update({'pos_embed': 'rope'} if 'pos_embed' in build else {})
    assert models_vit.checkpoint_kwargs(ckpt) == expected
    state = export(ckpt, tmp_path / 'enc.pth')
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('timm.'))
    model = eval(line.rsplit('.load_state_dict', 1)[0], {'timm': timm}).eval()  # the printed architecture
    model.load_state_dict(torch.load(tmp_path / 'enc.pth'), strict=True)
    assert set(state) == set(model.state_dict())
    ours, x = models_vit.load_encoder(ckpt), torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), ours(x))


@pytest.mark.parametrize('model,build', [('MIM_vit_tiny_patch4', {}), ('MIM_vit_tiny_patch4', dict(layer_scale=1e-5)),
                                         ('MIM_vit_tiny_patch4', dict(pos_embed='rope', layer_scale=1e-5)),
                                         ('MIM_swin_tiny_patch2_win4', {}), ('vit_tiny_patch4', {})])
def test_an_exported_folder_loads_with_one_timm_line(tmp_path, model, build):
    """config.json + model.safetensors + README.md: timm.create_model('local-dir:...') builds and loads it with
    no other argument; the line of its model card gives our outputs exactly (Swin's passes its norms' eps, 1e-6,
    which a config cannot say; without it, timm's 1e-5); the model card holds the recipe, not the paths or a token."""
    import models_mim
    ckpt = tmp_path / 'checkpoint.pth'
    if model.startswith('MIM_'):
        weights = models_mim.build(argparse.Namespace(**{**models_mim.BUILD_DEFAULTS, 'model': model, **build})) \
            .state_dict()
    else:  # a fine-tuned classifier
        weights = models_vit.build(model, num_classes=7).state_dict()
    secret = 'https://host/train.json?sig=<redacted>'
    torch.save({'model': weights, 'args': {'model': model, 'input_size': 32, 'epochs': 3, 'mask_ratio': 0.75,
                                           'data_path': secret, 'output_dir': '/home/me/run', **build}}, ckpt)
    run_script('-m', 'tools.export_timm', ckpt, tmp_path / 'export')
    assert {p.name for p in (tmp_path / 'export').iterdir()} == {'config.json', 'model.safetensors', 'README.md'}
    card = (tmp_path / 'export' / 'README.md').read_text()
    line = next(line for line in card.splitlines() if line.startswith('model = '))
    exact = eval(line.removeprefix('model = ').replace('PATH_TO_THIS_FOLDER', str(tmp_path / 'export')),
                 {'timm': timm, 'torch': torch, 'functools': functools}).eval()
    plain = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    ours, x = models_vit.load_encoder(ckpt) if model.startswith('MIM_') else None, torch.randn(2, 3, 32, 32)
    if ours is None:
        ours = models_vit.build(model, num_classes=7).eval()
        ours.load_state_dict(weights)
    with torch.no_grad():
        assert torch.equal(exact(x), ours(x))
        diff = (plain(x) - ours(x)).abs().max().item()
    assert diff <= (1e-4 if 'swin' in model else 0), diff
    assert "timm.create_model('local-dir:" in card and '| mask_ratio | 0.75 |' in card
    assert 'sig=' not in card and '/home/me' not in card
