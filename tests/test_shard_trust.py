"""Shard data is data: no command and no file outside the set from a descriptor, a cache that cannot mix sets, no
token written down, existing shard sets indexed once (tools.index_shards), every bad index one line at start."""
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_PRETRAIN, run_script, same_weights, script_env
from tools import index_shards, make_shards
from util.datasets import image_folder
from util.errors import UsageError
from util.pipeline import BadImageError, Readable
from util.redact import redact
from util.shards import ShardImages, auth_headers


@pytest.fixture(scope='module')
def shards(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp('shards')
    make_shards.main(make_shards.get_args_parser().parse_args([str(small_data), str(out), '--shard_size', '200000']))
    return out


def copy_of(shards, folder):
    shutil.copytree(shards, folder)
    return folder


def edit(descriptor, change):
    spec = json.loads(descriptor.read_text())
    change(spec)
    descriptor.write_text(json.dumps(spec))


def marker_command(marker):
    return f'pipe:touch {marker}; cat /dev/null'


@pytest.mark.parametrize('where', ['shardlist', 'index'])
def test_no_descriptor_entry_runs_a_command(tmp_path, shards, file_server, where):
    marker = tmp_path / 'ran'

    def plant(spec):
        if where == 'index':
            spec['index'] = marker_command(marker)
        else:
            spec['shardlist'][1]['url'] = marker_command(marker)
    edit(copy_of(shards, tmp_path / 'local') / 'train.json', plant)
    edit(copy_of(shards, tmp_path / 'www' / 'set') / 'train.json', plant)
    for data in (tmp_path / 'local', f'{file_server.url}/set'):
        with pytest.raises(UsageError, match="a descriptor's entries are never run as commands"):
            ShardImages(data, 'train', cache_dir=tmp_path / 'cache')
    proc = run_script('run_knn.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '0',
                      '--data_path', f'{file_server.url}/set', '--output_dir', tmp_path / 'knn', check=False)
    assert proc.returncode == 1 and "never run as commands" in proc.stderr.splitlines()[-1]
    assert not marker.exists()


@pytest.mark.parametrize('entry', ['absolute', 'file'])
def test_a_remote_descriptor_cannot_name_files_of_this_machine(tmp_path, shards, file_server, entry):
    secret = copy_of(shards, tmp_path / 'elsewhere')
    target = str(secret / 'train-000000.tar')
    edit(copy_of(shards, tmp_path / 'www' / 'set') / 'train.json',
         lambda spec: spec['shardlist'][0].update(url=target if entry == 'absolute' else f'file://{target}'))
    with pytest.raises(UsageError, match='a descriptor fetched by URL may name shards by URL or by a path relative'):
        ShardImages(f'{file_server.url}/set', 'train', cache_dir=tmp_path / 'cache')
    assert all('elsewhere' not in r for r in file_server.requests)


def test_urls_that_shared_a_cache_entry_keep_their_own_images(tmp_path, small_data, file_server):
    """.../a/b_c.tar and .../a/b/c.tar were one cache file: the second set read the first one's images."""
    www = tmp_path / 'www'
    one = tmp_path / 'one'
    make_shards.main(make_shards.get_args_parser().parse_args([str(small_data), str(one)]))  # one shard per split
    first_class = sorted((small_data / 'train').iterdir())[:1]
    two_src = tmp_path / 'two_src' / 'train'
    for d in first_class:
        shutil.copytree(d, two_src / d.name)
    two = tmp_path / 'two'
    make_shards.main(make_shards.get_args_parser().parse_args([str(two_src.parent), str(two)]))
    (www / 'a' / 'b').mkdir(parents=True)
    for src, folder, name in ((one, www / 'a', 'b_c.tar'), (two, www / 'a' / 'b', 'c.tar')):
        shutil.copy(src / 'train-000000.tar', folder / name)
        shutil.copy(src / 'train-index.npy', folder / 'train-index.npy')
        shutil.copy(src / 'train.json', folder / 'train.json')
        edit(folder / 'train.json', lambda spec: spec['shardlist'][0].update(url=name))
    cache = tmp_path / 'cache'
    a = ShardImages(f'{file_server.url}/a', 'train', cache_dir=cache)
    b = ShardImages(f'{file_server.url}/a/b', 'train', cache_dir=cache)
    folder_a, folder_b = image_folder(small_data, 'train', None), image_folder(two_src.parent, 'train', None)
    assert [a.read_bytes(i) for i in range(len(a))] == [folder_a.read_bytes(i) for i in range(len(folder_a))]
    assert [b.read_bytes(i) for i in range(len(b))] == [folder_b.read_bytes(i) for i in range(len(folder_b))]
    assert len([p for p in cache.iterdir() if p.suffix == '.tar']) == 2  # an entry each, none overwritten


def test_a_shard_changed_at_its_url_is_fetched_again(tmp_path, shards, small_data, file_server):
    served = copy_of(shards, tmp_path / 'www' / 'set')
    cache = tmp_path / 'cache'
    before = ShardImages(f'{file_server.url}/set', 'train', cache_dir=cache)
    old = before.read_bytes(0)
    other = tmp_path / 'other'
    shutil.copytree(small_data, other)
    first = sorted((other / 'train').rglob('*.png'))[0]
    shutil.copy(sorted((other / 'train').rglob('*.png'))[-1], first)  # image 0 is now another picture
    shutil.rmtree(served)
    make_shards.main(make_shards.get_args_parser().parse_args([str(other), str(served), '--shard_size', '200000']))
    after = ShardImages(f'{file_server.url}/set', 'train', cache_dir=cache)
    assert after.read_bytes(0) == first.read_bytes() != old


def test_a_failed_fetch_leaves_no_lock_and_says_what(tmp_path, shards, file_server):
    served = copy_of(shards, tmp_path / 'www' / 'set')
    (served / 'train-000001.tar').unlink()
    cache = tmp_path / 'cache'
    with pytest.raises(UsageError, match=r'cannot fetch http://\S+/set/train-000001.tar into .*HTTPError'):
        ShardImages(f'{file_server.url}/set', 'train', cache_dir=cache)
    assert not [p for p in cache.iterdir() if p.name.startswith('.')]


def test_tokens_are_never_written_down(tmp_path, shards, file_server):
    """A signed URL's query and a pipe: command's header: out of stdout, log.txt, checkpoints, TensorBoard and
    record.sh's log, while the run reads with them."""
    copy_of(shards, tmp_path / 'www' / 'set')
    token = f'SeCrEt{os.getpid()}{time.time_ns()}'  # in no file (record.sh's log holds the uncommitted diff)
    data = f'{file_server.url}/set/train.json?X-Amz-Signature={token}'
    out, logs = tmp_path / 'run', tmp_path / 'logs'
    python = str(REPO / '.venv/bin/python') if (REPO / '.venv/bin/python').exists() else 'python3'
    proc = subprocess.run(['bash', 'record.sh', f'RECORD_DIR={logs}', f'MY_TOKEN={token}', python, 'run_pretrain.py',
                           *TINY_PRETRAIN, '--epochs', '1', '--data_path', data, '--output_dir', str(out),
                           '--shard_cache', str(tmp_path / 'cache')], cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert token not in proc.stdout + proc.stderr and '<redacted>' in proc.stdout
    written = [f for f in list(out.iterdir()) + list(logs.iterdir()) if f.is_file()]
    assert any(f.name.startswith('events.out') for f in written) and any(f.suffix == '.pth' for f in written)
    for f in written:
        assert token.encode() not in f.read_bytes(), f.name
    assert torch.load(out / 'checkpoint-last.pth')['args']['data_path'].endswith('X-Amz-Signature=<redacted>')
    header = "pipe:curl -s -L https://host/train.json -H 'Authorization: Bearer hf_abcdefghijklmnopqrstuv'"
    assert redact(header) == "pipe:curl -s -L https://host/train.json -H 'Authorization: Bearer <redacted>'"
    assert redact('https://user:pass@host/x.tar') == 'https://<redacted>@host/x.tar'


def test_hugging_face_reads_take_the_token_from_the_environment_and_send_it_nowhere_else(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_token_value')
    assert auth_headers('https://huggingface.co/datasets/x/resolve/main/a.tar') == \
        {'Authorization': 'Bearer hf_token_value'}
    assert auth_headers('https://cdn-lfs.huggingface.co/x') == {'Authorization': 'Bearer hf_token_value'}
    assert auth_headers('https://evil.example/huggingface.co/a.tar') == {}
    assert auth_headers('https://huggingface.co.evil.example/a.tar') == {}


def timm_layout(small_data, folder, split, prefix, per_shard):
    """small_data's split in the layout of timm/imagenet-1k-wds: <key>.jpg (here .png), .cls, .json, written by
    webdataset's ShardWriter into <prefix>-NNNN.tar."""
    import webdataset
    images = image_folder(small_data, split, None)
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / f'{prefix}-%04d.tar'), maxcount=per_shard, verbose=0) as sink:
        for i, (path, label) in enumerate(images.samples):
            sink.write({'__key__': f'{split}_{i:08d}', path.rsplit('.', 1)[-1]: images.read_bytes(i),
                        'cls': str(label).encode(), 'json': json.dumps({'label': label}).encode()})
    return images


def test_index_shards_reads_a_public_layout_with_the_folders_bytes_and_labels(tmp_path, small_data, capsys):
    folder = tmp_path / 'wds'
    images = timm_layout(small_data, folder, 'train', 'imagenet1k-train', 30)
    timm_layout(small_data, folder, 'val', 'imagenet1k-validation', 30)
    classes = tmp_path / 'classes.txt'
    classes.write_text('\n'.join(images.classes))
    index_shards.main(index_shards.get_args_parser().parse_args(
        [f'{folder}/imagenet1k-train-{{0000..0002}}.tar', '--split', 'train', '--classes', str(classes)]))
    assert 'train: 80 samples of 10 classes in 3 shards indexed' in capsys.readouterr().out
    index_shards.main(index_shards.get_args_parser().parse_args(
        [str(folder), '--split', 'validation', '--label_field', 'label', '--output_dir', str(tmp_path / 'v')]))
    for data in (folder, f'{folder}/imagenet1k-train-{{0000..0002}}.tar'):
        sharded = image_folder(data, 'train', None)
        assert sharded.classes == images.classes and sharded.targets == images.targets
        assert [sharded.read_bytes(i) for i in range(80)] == [images.read_bytes(i) for i in range(80)]
    val = ShardImages(tmp_path / 'v' / 'validation.json', 'validation')
    assert len(val) == 40 and val.targets == image_folder(small_data, 'val', None).targets
    assert json.loads((tmp_path / 'v' / 'validation.json').read_text())['shardlist'][0]['url'].startswith('/')


def test_index_shards_resumes_at_its_last_finished_shard(tmp_path, small_data, monkeypatch, capsys):
    folder = tmp_path / 'wds'
    timm_layout(small_data, folder, 'train', 'part', 20)
    real, scanned = index_shards.scan, []

    def killed_after_two(*args):
        if len(scanned) == 2:
            raise KeyboardInterrupt
        scanned.append(args[1])
        return real(*args)
    monkeypatch.setattr(index_shards, 'scan', killed_after_two)
    args = index_shards.get_args_parser().parse_args([str(folder), '--split', 'train'])
    with pytest.raises(KeyboardInterrupt):
        index_shards.main(args)
    monkeypatch.setattr(index_shards, 'scan', lambda *a: scanned.append(a[1]) or real(*a))
    index_shards.main(args)
    assert 'resuming at shard 2 of 4' in capsys.readouterr().out and scanned == [0, 1, 2, 3]
    assert len(image_folder(folder, 'train', None)) == 80 and not list(folder.glob('.*'))


@pytest.mark.slow
def test_a_public_layout_set_trains_as_the_folder_does(tmp_path, small_data):
    folder = tmp_path / 'wds'
    timm_layout(small_data, folder, 'train', 'imagenet1k-train', 25)
    run_script('-m', 'tools.index_shards', folder, '--split', 'train')
    for name, data in (('folder', small_data), ('shards', f'{folder}/imagenet1k-train-{{0000..0003}}.tar')):
        run_script('run_pretrain.py', *TINY_PRETRAIN, '--batch_size', '8', '--epochs', '1',
                   '--data_path', data, '--output_dir', tmp_path / name)
    assert same_weights(tmp_path / 'folder', tmp_path / 'shards') == 0


def test_shards_without_an_index_name_the_command_that_makes_one(tmp_path, small_data):
    folder = tmp_path / 'wds'
    timm_layout(small_data, folder, 'train', 'imagenet1k-train', 30)
    for data in (folder, f'{folder}/imagenet1k-train-{{0000..0002}}.tar'):
        with pytest.raises(UsageError, match=r'python -m tools.index_shards \S+ --split train'):
            image_folder(data, 'train', None)
    (folder / 'train.json').write_text(json.dumps({'wids_version': 1, 'shardlist': [
        {'url': 'imagenet1k-train-0000.tar', 'nsamples': 30}]}))  # a wids descriptor (widsindex) has no index
    with pytest.raises(UsageError, match=r'has no index of its samples .*python -m tools.index_shards'):
        image_folder(folder, 'train', None)


def bad_index(spec, index, case):
    if case == 'shard outside':
        index[5, 0] = len(spec['shardlist'])
    elif case == 'label outside':
        index[5, 3] = len(spec['classes'])
    elif case == 'past the end':
        index[5, 1] = spec['shardlist'][index[5, 0]]['filesize']
    elif case == 'rows missing':
        index = index[:-1]
    elif case == '3 columns':
        index = index[:, :3]
    return index


INDEX_CASES = [('shard outside', 'shard numbers outside its'), ('label outside', 'labels outside its 10 classes'),
               ('past the end', 'row 5 reaching past the end of shard'),
               ('rows missing', '79 rows where its shards hold 80 samples'),
               ('3 columns', r'has shape \(80, 3\)'), ('no index', r'cannot read the index of \S+train-index.npy'),
               ('truncated json', 'is not readable JSON'), ('truncated index', 'the index of .* cannot be read')]


@pytest.mark.parametrize('case,message', INDEX_CASES, ids=[c for c, _ in INDEX_CASES])
def test_a_bad_index_is_one_line_naming_the_descriptor(tmp_path, shards, case, message):
    broken = copy_of(shards, tmp_path / 'broken')
    spec = json.loads((broken / 'train.json').read_text())
    index = np.load(broken / 'train-index.npy')
    if case == 'no index':
        (broken / 'train-index.npy').unlink()
    elif case == 'truncated json':
        (broken / 'train.json').write_text((broken / 'train.json').read_text()[:100])
    elif case == 'truncated index':
        data = (broken / 'train-index.npy').read_bytes()
        (broken / 'train-index.npy').write_bytes(data[:len(data) // 2])
    else:
        np.save(broken / 'train-index.npy', bad_index(spec, index, case))
    with pytest.raises(UsageError, match=message):
        image_folder(broken, 'train', None)


def test_a_bad_index_stops_the_run_at_start_in_one_line(tmp_path, shards):
    broken = copy_of(shards, tmp_path / 'broken')
    index = np.load(broken / 'train-index.npy')
    index[3, 3] = 99
    np.save(broken / 'train-index.npy', index)
    proc = run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', broken, '--output_dir', tmp_path / 'o',
                      check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: the index of {broken / 'train.json'} has labels")


def test_a_read_error_is_a_bad_image_named_by_shard_and_index(tmp_path, shards):
    broken = copy_of(shards, tmp_path / 'broken')
    images = ShardImages(broken, 'train')
    shard = images.index[-1, 0]
    with open(broken / f'train-{shard:06d}.tar', 'r+b') as f:  # cut after the start's check
        f.truncate(int(images.index[-1, 1]))
    with pytest.raises(BadImageError, match=rf'cannot read image \S+train-{shard:06d}.tar:79 \(OSError'):
        images[79]
    assert Readable(images, skip_bad=True)[79] is None and Readable(images, skip_bad=True)[0] is not None


@pytest.mark.slow
def test_knn_and_evaluation_skip_unreadable_images_when_asked(tmp_path, small_data, pretrain_ckpt):
    broken = tmp_path / 'broken'
    shutil.copytree(small_data, broken)
    for split in ('train', 'val'):
        next((broken / split).rglob('*.png')).write_bytes(b'not an image')
    knn = ['run_knn.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '0', '--finetune',
           pretrain_ckpt, '--data_path', broken, '--output_dir', tmp_path / 'knn']
    proc = run_script(*knn, check=False)
    assert proc.returncode == 1 and 'cannot read image' in proc.stderr.splitlines()[-1]
    proc = run_script(*knn, '--skip_bad_images')
    assert 'train: 1 unreadable image(s) skipped' in proc.stdout and 'on 39 images: top-1' in proc.stdout
    proc = run_script('run_finetune.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '16',
                      '--num_workers', '0', '--epochs', '1', '--warmup_epochs', '0.5', '--finetune', pretrain_ckpt,
                      '--data_path', broken, '--output_dir', tmp_path / 'ft', '--skip_bad_images')
    assert '(39 images; 1 unreadable skipped)' in proc.stdout


def test_a_pipe_data_path_is_the_users_own_command_and_its_failure_one_line(tmp_path, shards, file_server):
    copy_of(shards, tmp_path / 'www' / 'set')
    spec = json.loads((shards / 'train.json').read_text())
    for s in spec['shardlist']:
        s['url'] = f"{file_server.url}/set/{s['url']}"
    spec['index'] = f"{file_server.url}/set/{spec['index']}"
    (tmp_path / 'remote.json').write_text(json.dumps(spec))
    piped = ShardImages(f"pipe:cat {tmp_path / 'remote.json'}", 'train', cache_dir=tmp_path / 'cache')
    local = ShardImages(shards, 'train')
    assert [piped.read_bytes(i) for i in range(80)] == [local.read_bytes(i) for i in range(80)]
    with pytest.raises(UsageError, match=r'cannot read the shard list pipe:cat /nonexistent.json \(OSError: the '
                                         r'command exited with status 1\)'):
        ShardImages('pipe:cat /nonexistent.json', 'train')
    with pytest.raises(UsageError, match='a descriptor read through a command names its shards by http'):
        ShardImages(f"pipe:cat {shards / 'train.json'}", 'train')
