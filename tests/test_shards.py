"""Tar shards (tools/make_shards.py, util/shards.py): made once and resumably, read with the same samples and pixels
as the folder they were made from, one open per shard, clear errors for what is missing."""
import json
import shutil

import pytest
import torch

from conftest import TINY_PRETRAIN, FileServer, run_script, same_weights, start
from tools import make_shards
from util import pipeline
from util.datasets import build_pretrain_loader, image_folder
from util.errors import UsageError
from util.pipeline import BadImageError, CropSamples
from util.shards import ShardImages


def make(source, out, shard_size=200_000):
    make_shards.main(make_shards.get_args_parser().parse_args([str(source), str(out), '--shard_size',
                                                               str(shard_size)]))


@pytest.fixture(scope='module')
def shards(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp('shards')
    make(small_data, out)
    return out


def test_shards_hold_the_folders_images_in_order(shards, small_data):
    spec = json.loads((shards / 'train.json').read_text())
    assert len(spec['shardlist']) > 3 and sum(s['nsamples'] for s in spec['shardlist']) == 80
    folder, sharded = image_folder(small_data, 'train', None), image_folder(shards, 'train', None)
    assert isinstance(sharded, ShardImages)
    assert sharded.classes == folder.classes and sharded.targets == folder.targets
    for i in range(len(folder)):
        assert sharded.read_bytes(i) == folder.read_bytes(i)  # the original bytes, never re-encoded
    assert len(image_folder(shards, 'val', None)) == 40
    assert sharded[5][0].size == folder[5][0].size and sharded[5][1] == folder[5][1]


@pytest.mark.parametrize('loader', pipeline.LOADERS)
def test_every_loader_gives_the_folders_crops_and_masks(shards, small_data, loader):
    folder, sharded = image_folder(small_data, 'train', None), image_folder(shards, 'train', None)
    a, b = (CropSamples(images, 3, 32, noise_len=64, loader=loader, views=2) for images in (folder, sharded))
    for i in range(0, 80, 7):
        for (x, noise), (y, noise_b) in zip(a[(2, i)], b[(2, i)]):
            assert torch.equal(noise, noise_b)
            if loader in pipeline.DEVICE_DECODE:
                assert torch.equal(x.data, y.data) and x.box == y.box and x.flip == y.flip
            else:
                assert torch.equal(x, y)


def test_the_pretraining_loader_gives_the_same_batches(shards, small_data):
    batches = []
    for data in (small_data, shards):
        args = argparse_namespace(data_path=data)
        _, loader, sampler = build_pretrain_loader(args, 64)
        sampler.set_epoch(1, 16)  # part-way, as a resumed run starts
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 3  # rank 0 of 2: 40 images, 16 of them done
    for (x, n, bad), (y, m, bad_b) in zip(*batches):
        assert torch.equal(x, y) and torch.equal(n, m) and bad == bad_b == 0


def argparse_namespace(**kw):
    import argparse
    return argparse.Namespace(**{'shard_cache': None, 'rank': 0, 'world_size': 2, 'seed': 0, 'input_size': 32,
                                 'skip_bad_images': False, 'loader': 'fast', 'batch_size': 8, 'repeated_aug': 1,
                                 'masks_per_image': 1, 'mask_sets': 'random',
                                 'num_workers': 0, 'pin_mem': False, 'device': 'cpu', 'stop_signals': 'none', **kw})


def test_make_shards_resumes_where_it_stopped_and_refuses_another_set(tmp_path, shards, small_data, monkeypatch,
                                                                        capsys):
    real, written = make_shards.write_shard, []

    def killed_after_two(*args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(args[-1])
        return real(*args)

    monkeypatch.setattr(make_shards, 'write_shard', killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        make(small_data, tmp_path / 'out')
    assert not (tmp_path / 'out' / 'train.json').exists()
    monkeypatch.setattr(make_shards, 'write_shard', real)
    make(small_data, tmp_path / 'out')
    assert 'train: resuming at image' in capsys.readouterr().out
    for f in shards.iterdir():
        assert (tmp_path / 'out' / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list((tmp_path / 'out').glob('.*'))  # no temporary or progress file left
    make(small_data, tmp_path / 'out')
    assert 'train: already made' in capsys.readouterr().out
    other = tmp_path / 'other'
    shutil.copytree(small_data, other)
    next((other / 'train').rglob('*.png')).unlink()
    with pytest.raises(UsageError, match='holds the shards of another set than'):
        make(other, tmp_path / 'out')


def test_a_missing_or_truncated_shard_is_one_line(tmp_path, shards):
    broken = tmp_path / 'broken'
    shutil.copytree(shards, broken)
    data = (broken / 'train-000002.tar').read_bytes()
    (broken / 'train-000002.tar').write_bytes(data[:len(data) // 2])
    with pytest.raises(UsageError, match=r'shard .*train-000002.tar is truncated: \d+ of its \d+ bytes; restore it'):
        image_folder(broken, 'train', None)
    (broken / 'train-000002.tar').unlink()
    with pytest.raises(UsageError, match=r'shard .*train-000002.tar cannot be opened \(No such file'):
        image_folder(broken, 'train', None)
    (broken / 'val.json').unlink()
    with pytest.raises(UsageError,
                       match=r'has no val.json: index its tar shards once with python -m tools.index_shards \S+ --split val'):
        image_folder(broken, 'val', None)


def test_a_corrupt_image_in_a_shard_is_named_and_skipped(tmp_path, shards):
    broken = tmp_path / 'broken'
    shutil.copytree(shards, broken)
    images = image_folder(broken, 'train', None)
    shard, offset, size, _ = images.index[9].tolist()
    with open(broken / f'train-{shard:06d}.tar', 'r+b') as f:
        f.seek(offset)
        f.write(b'\0' * size)
    images = image_folder(broken, 'train', None)
    with pytest.raises(BadImageError, match=rf'cannot read image .*train-{shard:06d}.tar:9 '):
        CropSamples(images, 0, 32)[(0, 9)]
    assert CropSamples(images, 0, 32, skip_bad=True)[(0, 9)] is None
    assert CropSamples(images, 0, 32, skip_bad=True)[(0, 8)] is not None


def test_a_brace_pattern_reads_the_shards_it_names(shards):
    full = image_folder(shards, 'train', None)
    some = image_folder(f'{shards}/train-{{000000..000001}}.tar', 'train', None)
    first_two = sum(s['nsamples'] for s in json.loads((shards / 'train.json').read_text())['shardlist'][:2])
    assert len(some) == first_two
    assert [some.read_bytes(i) for i in range(len(some))] == [full.read_bytes(i) for i in range(first_two)]
    val = image_folder(f'{shards}/train-{{000000..000001}}.tar', 'val', None)  # the folder's val.json
    assert len(val) == 40


def serve(shards, www, name='set'):
    """A copy of the shards under www/<name>/, as a web server or an object store holds them."""
    shutil.copytree(shards, www / name)
    return www / name


def test_shards_named_by_url_are_fetched_into_the_cache_once(tmp_path, shards, file_server):
    serve(shards, tmp_path / 'www')
    cache = tmp_path / 'cache'
    remote = ShardImages(f'{file_server.url}/set', 'train', cache_dir=cache)
    local = image_folder(shards, 'train', None)
    assert [remote.read_bytes(i) for i in range(80)] == [local.read_bytes(i) for i in range(80)]
    n_shards = len(json.loads((shards / 'train.json').read_text())['shardlist'])
    assert sorted(file_server.requests) == sorted(['/set/train.json', '/set/train-index.npy'] +
                                                  [f'/set/train-{k:06d}.tar' for k in range(n_shards)])
    ShardImages(f'{file_server.url}/set', 'train', cache_dir=cache)
    assert len(file_server.requests) == n_shards + 4  # the shards are kept; the descriptor and index read anew
    assert not [p for p in cache.iterdir() if p.name.startswith('.')]  # no lock or temporary file left


def test_processes_sharing_a_cache_fetch_each_shard_once(tmp_path, shards):
    """The processes of a node (two here) start together on a cold cache: every shard is copied once, by one of
    them, while the other waits for it or copies another; both then read the same bytes."""
    serve(shards, tmp_path)
    server = FileServer(tmp_path, delay=0.2)  # a slow copy, so that the two processes meet on a shard
    try:
        read = ("import sys, hashlib; from util.shards import ShardImages; d = ShardImages(sys.argv[1], 'train', "
                "cache_dir=sys.argv[2]); print(hashlib.sha1(b''.join(d.read_bytes(i) for i in range(len(d))))"
                ".hexdigest())")
        procs = [start(['-c', read, f'{server.url}/set', tmp_path / 'cache']) for _ in range(2)]
        digests = [p.communicate(timeout=120)[0].splitlines()[-1] for p in procs]
    finally:
        server.close()
    assert [p.returncode for p in procs] == [0, 0] and digests[0] == digests[1]
    shard_reads = [r for r in server.requests if r.endswith('.tar')]
    assert sorted(shard_reads) == sorted(set(shard_reads))
    cached = [p.name for p in (tmp_path / 'cache').iterdir()]
    assert len(cached) == 2 * len(shard_reads) and not [n for n in cached if n.startswith('.')]  # copy + its id


@pytest.mark.slow
def test_pretraining_and_knn_on_shards_end_as_on_the_folder(tmp_path, shards, small_data, pretrain_ckpt):
    for name, data in (('folder', small_data), ('shards', shards)):
        run_script('run_pretrain.py', *TINY_PRETRAIN, '--batch_size', '8', '--epochs', '1', '--num_workers', '2',
                   '--data_path', data, '--output_dir', tmp_path / name)
    assert same_weights(tmp_path / 'folder', tmp_path / 'shards') == 0
    knn = [run_script('run_knn.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '1',
                      '--finetune', pretrain_ckpt, '--data_path', data, '--output_dir', tmp_path / f'knn_{name}').stdout
           for name, data in (('folder', small_data), ('shards', shards))]
    results = [[line.split('] ', 1)[1] for line in out.splitlines() if 'kNN (k=' in line] for out in knn]
    assert results[0] == results[1] and 'on 40 images: top-1' in results[0][0]
