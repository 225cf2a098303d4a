"""Images in webdataset tar shards: a shared filesystem pays for one open per shard instead of one per image, and an
object store holds no folders.

A split is a descriptor in wids' format (`<split>.json`: url, nsamples, filesize and a content id per shard, plus
the class names and the name of the index) and an index (`<split>-index.npy`: shard, byte offset, size and class
of every image). `python -m tools.make_shards` writes shards, descriptor and index from class folders (sample i is
the folder's image i); `python -m tools.index_shards` writes descriptor and index for shards that exist (webdataset's
layout, e.g. timm/imagenet-1k-wds) by one scan of their tar headers. A sample is then one positioned read (os.pread)
from its shard at a known offset: no shard is scanned, and each shard is opened once, when the dataset is made
(loader workers inherit the descriptors). wids, whose descriptor format this is, scans a shard's headers whenever
its cache of open shards misses, and keeps at most 100 files open per process.

Trust: a descriptor and its index are data, checked where they are read (parse_descriptor, parse_index), and
nothing in them is run: a `pipe:` command is run only where --data_path itself is one. A local descriptor is
trusted as a script is (its entries may name any path); one fetched by URL names shards by URL or relative to
itself, never files of this machine. Shards named by URL are copied into a cache folder once per node (a lock per
shard; the processes start at different places in the list), under a hash of the whole URL, and fetched again when
the descriptor's size or content id differs from the copy's; the descriptor and index are read anew each run.
"""
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import torch

from util.distributed import get_rank, get_world_size
from util.errors import UsageError
from util.pipeline import bad_image, load_rgb_bytes
from util.redact import redact

FETCH_THREADS = 8  # copies of remote shards under way at once per process (they wait on the network, not the CPU)
CONTENT_IDS = {'sha256': hashlib.sha256, 'md5sum': hashlib.md5}  # make_shards writes sha256; wids' md5sum


def is_shards(data_path):
    """Whether --data_path names shards: a descriptor (.json), a brace pattern or file of .tar shards, a URL or
    pipe: command, or a folder of .tar shards (with their descriptors, or none yet: then no class folders)."""
    if data_path is None:
        return False
    text = str(data_path)
    if text.endswith(('.json', '.tar')) or '{' in text or '://' in text or text.startswith('pipe:'):
        return True
    folder = Path(text)
    return folder.is_dir() and any(folder.glob('*.tar')) and (
        any(folder.glob('*.json')) or not any(p.is_dir() for p in folder.iterdir()))


def is_remote(url):
    return url.startswith(('http://', 'https://', 'pipe:'))


def entry_url(descriptor, entry):
    """Where a descriptor's entry (a shard or its index) is. Nothing in a descriptor is run: a pipe: entry is
    refused. A local descriptor is trusted input, like a script: its entries are paths (relative to its folder),
    file:// or http(s) URLs. A descriptor fetched by URL names shards by URL or by a path relative to its own URL
    (as wids resolves it), never files of this machine."""
    shown = f"{redact(descriptor)} names {redact(entry)!r}"
    if entry.startswith('pipe:'):
        raise UsageError(f"{shown}: a descriptor's entries are never run as commands; name each shard by a path or "
                         f"an http(s) URL")
    scheme = urlparse(entry).scheme
    if scheme in ('http', 'https'):
        return entry
    if is_remote(descriptor):
        if descriptor.startswith('pipe:'):
            raise UsageError(f"{shown}: a descriptor read through a command names its shards by http(s) URL")
        if scheme or entry.startswith('/'):
            raise UsageError(f"{shown}: a descriptor fetched by URL may name shards by URL or by a path relative to "
                             f"it, not files of this machine")
        return urljoin(descriptor, entry)
    if scheme == 'file':
        return entry.removeprefix('file://')
    if scheme:
        raise UsageError(f"{shown}: only paths, file:// and http(s):// URLs are read")
    return str(Path(descriptor).parent / entry)


def auth_headers(url):
    """HTTP headers of a read of `url`: $HF_TOKEN for huggingface.co, so that no token needs to be on the command
    line (and so in any log), and none is sent to another host."""
    host = urlparse(url).hostname or ''
    token = os.environ.get('HF_TOKEN')
    if token and (host == 'huggingface.co' or host.endswith('.huggingface.co')):
        return {'Authorization': f'Bearer {token}'}
    return {}


@contextlib.contextmanager
def open_remote(url):
    """A readable stream of an http(s) URL, or of the output of the user's own pipe: command (--data_path), whose
    exit status is checked once it is read."""
    if not url.startswith('pipe:'):
        with urllib.request.urlopen(urllib.request.Request(url, headers=auth_headers(url)), timeout=60) as src:
            yield src
        return
    proc = subprocess.Popen(url.removeprefix('pipe:'), shell=True, stdout=subprocess.PIPE)
    with proc.stdout as src:
        yield src
    if proc.wait():
        raise OSError(f'the command exited with status {proc.returncode}')


def read(url, what):
    """All the bytes of a descriptor or an index (small: read anew each run, never cached), one line on failure."""
    try:
        if not is_remote(url):
            return Path(url).read_bytes()
        with open_remote(url) as src:
            data = src.read()
        if not data:
            raise OSError('nothing was read')
        return data
    except Exception as e:
        raise UsageError(f"cannot read {what} {redact(url)} ({type(e).__name__}: {redact(str(e))}); check the path "
                         f"or URL") from None


def write_atomically(path, data):
    """`data` (bytes) into `path` under a temporary name, then renamed: a reader never sees half a file."""
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_split(out, spec, index):
    """A split's index (N, 4) and then its descriptor `spec` (which names the index) into folder `out`, the format
    ShardImages reads; each written atomically, so that a descriptor is never there without its index."""
    buffer = io.BytesIO()
    np.save(buffer, index)
    write_atomically(out / spec['index'], buffer.getvalue())
    write_atomically(out / f"{spec['name']}.json", json.dumps(spec, indent=1).encode())


def file_sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def cache_entry(cache, url):
    """A cache file named by a hash of the whole URL (two URLs never share one), with the URL's file name after
    it for a reader."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:32]
    name = re.sub(r'[^A-Za-z0-9._-]', '_', urlparse(url).path.rsplit('/', 1)[-1] or 'shard')[-64:]
    return cache / f'{digest}-{name}'


def content_id(shard):
    """[field, value] of a shard's content id in its descriptor entry, or None."""
    return next(([k, shard[k]] for k in CONTENT_IDS if shard.get(k)), None)


def fetch(url, cache_dir, shard):
    """A local path holding shard `url` (an entry of the descriptor: filesize, content id): local paths as they
    are; remote ones copied into the cache once, and again when the descriptor's size or content id differs from
    the copy's. The copy is written under a temporary name, checked, then renamed, under a lock on the cache
    entry, so the processes of a node sharing the cache copy each shard once; no lock outlives its fetch."""
    if not is_remote(url):
        return url
    cache = Path(cache_dir or Path.home() / '.cache' / 'mim_shards')
    cache.mkdir(parents=True, exist_ok=True)
    local = cache_entry(cache, url)
    meta = local.with_name(local.name + '.json')
    expected = {'filesize': shard.get('filesize'), 'content_id': content_id(shard)}

    def cached():
        return local.exists() and meta.exists() and json.loads(meta.read_text()) == expected \
            and (expected['filesize'] is None or local.stat().st_size == expected['filesize'])
    if cached():
        return str(local)
    lock_path = local.with_name(f'.{local.name}.lock')
    try:
        with open(lock_path, 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process copying it: wait for its copy
            if not cached():
                copy(url, local, cache, expected)
                meta.write_text(json.dumps(expected))
    finally:
        lock_path.unlink(missing_ok=True)  # done or failed: a process still waiting on this lock checks again
    return str(local)


def copy(url, local, cache, expected):
    tmp = local.with_name(f'.{local.name}.{os.getpid()}')
    digest = CONTENT_IDS[expected['content_id'][0]]() if expected['content_id'] else None
    try:
        with open_remote(url) as src, open(tmp, 'wb') as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                if digest:
                    digest.update(chunk)
        size = tmp.stat().st_size
        if expected['filesize'] is not None and size != expected['filesize']:
            raise OSError(f"{size} bytes, the descriptor says {expected['filesize']}")
        if digest and digest.hexdigest() != expected['content_id'][1]:
            raise OSError(f"its {expected['content_id'][0]} differs from the descriptor's")
        os.replace(tmp, local)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot fetch {redact(url)} into {cache} ({type(e).__name__}: {redact(str(e))}); check "
                         f"the URL and the descriptor, or pass another --shard_cache") from None


def fetch_all(urls, shards, cache_dir):
    """fetch() of every url, FETCH_THREADS at a time, starting at this process's place in the list (its rank), so
    that the processes of a node copy different shards at once rather than wait on each other's locks."""
    if not any(map(is_remote, urls)):
        return list(urls)
    first = get_rank() * len(urls) // get_world_size()
    order = list(range(first, len(urls))) + list(range(first))
    print(f'Fetching {sum(map(is_remote, urls))} remote shard(s) into the cache (those already there are kept)')
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        paths = dict(zip(order, pool.map(lambda k: fetch(urls[k], cache_dir, shards[k]), order)))
    return [paths[k] for k in range(len(urls))]


def index_command(location, split):
    return f"python -m tools.index_shards {location} --split {split}"


def locate(data_path, split):
    """(descriptor url, names of the shards to read or None for all) of --data_path's `split`. A brace pattern
    or a .tar names train shards of any names; their folder's <split>.json describes them (and the other splits)."""
    text = str(data_path)
    if text.endswith('.json') or text.startswith('pipe:'):
        return text, None
    if '{' in text or text.endswith('.tar'):
        from braceexpand import braceexpand
        folder = text.rsplit('/', 1)[0] if '/' in text else '.'
        descriptor = f'{folder}/{split}.json'
        if not is_remote(text) and not Path(descriptor).is_file():
            raise UsageError(f"--data_path {text}: {descriptor} describes no shards yet; index them once with "
                             f"{index_command(repr(text), split)} (or make them with python -m tools.make_shards)")
        return descriptor, ({p.rsplit('/', 1)[-1] for p in braceexpand(text)} if split == 'train' else None)
    descriptor = f'{text.rstrip("/")}/{split}.json'
    if not is_remote(text) and not Path(descriptor).is_file():
        remedy = (f"index its tar shards once with {index_command(text, split)}" if any(Path(text).glob('*.tar'))
                  else "make shards from class folders with python -m tools.make_shards")
        raise UsageError(f"--data_path {text} has no {split}.json: {remedy}")
    return descriptor, None


def parse_descriptor(data, url, split):
    """The descriptor's dict, checked for what ShardImages reads; one line naming it otherwise."""
    try:
        spec = json.loads(data)
    except ValueError as e:
        raise UsageError(f"{redact(url)} is not readable JSON ({e}); make or index the shards again") from None
    if not isinstance(spec, dict) or not isinstance(spec.get('shardlist'), list) or \
            not all(isinstance(s, dict) and isinstance(s.get('url'), str) for s in spec['shardlist']):
        raise UsageError(f"{redact(url)} is not a shard list (a 'shardlist' of entries with a 'url'); make or index "
                         f"the shards again")
    if 'index' not in spec or 'classes' not in spec:
        folder = url.rsplit('/', 1)[0] if '/' in url else '.'
        raise UsageError(f"{redact(url)} has no index of its samples (a wids descriptor, or another tool's): index "
                         f"its shards once with {index_command(folder, split)}")
    return spec


def parse_index(data, url, spec):
    """The (N, 4) index (shard, offset, size, class), checked against the descriptor; one line naming it
    otherwise."""
    shown = redact(url)
    try:
        index = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise UsageError(f"the index of {shown} cannot be read ({type(e).__name__}: {e}); index the shards "
                         f"again") from None
    if index.ndim != 2 or index.shape[1] != 4 or not np.issubdtype(index.dtype, np.integer):
        raise UsageError(f"the index of {shown} has shape {index.shape} ({index.dtype}): rows of 4 integers (shard, "
                         f"offset, size, class) are expected; index the shards again")
    shards, classes = spec['shardlist'], spec['classes']
    counts = [s.get('nsamples') for s in shards]
    bad = None
    if len(index) and not (0 <= index[:, 0].min() and index[:, 0].max() < len(shards)):
        bad = f"shard numbers outside its {len(shards)} shards"
    elif len(index) and not (0 <= index[:, 3].min() and index[:, 3].max() < len(classes)):
        bad = f"labels outside its {len(classes)} classes"
    elif len(index) and (index[:, 1].min() < 0 or index[:, 2].min() < 0):
        bad = "negative offsets or sizes"
    elif None not in counts and len(index) != sum(counts):
        bad = f"{len(index)} rows where its shards hold {sum(counts)} samples (nsamples)"
    else:
        sizes = np.array([s.get('filesize') or np.iinfo(np.int64).max for s in shards], dtype=np.int64)
        past = np.flatnonzero(index[:, 1] + index[:, 2] > sizes[index[:, 0]])
        if len(past):
            row = index[past[0]]
            bad = f"row {past[0]} reaching past the end of shard {row[0]} ({sizes[row[0]]} bytes)"
    if bad:
        raise UsageError(f"the index of {shown} has {bad}; index the shards again (python -m tools.index_shards, "
                         f"or tools.make_shards)")
    return index


class ShardImages(torch.utils.data.Dataset):
    """One split of make_shards' or index_shards' output, used as the project uses torchvision's ImageFolder:
    `classes`, `targets`, `root`, dataset[i] = (transform(PIL image), target), plus the bytes of image i
    (`read_bytes`) for the uint8 pipeline's decoders, and `name(i)` for messages."""

    def __init__(self, data_path, split, transform=None, cache_dir=None):
        url, selected = locate(data_path, split)
        spec = parse_descriptor(read(url, 'the shard list'), url, split)
        self.root, self.classes, self.transform = redact(url), spec['classes'], transform
        shards = spec['shardlist']
        self.urls = [entry_url(url, s['url']) for s in shards]
        index = parse_index(read(entry_url(url, spec['index']), 'the index of'), url, spec)
        if selected is not None:
            keep = [k for k, u in enumerate(self.urls) if u.rsplit('/', 1)[-1] in selected]
            if len(keep) != len(selected):
                missing = sorted(selected - {self.urls[k].rsplit('/', 1)[-1] for k in keep})
                raise UsageError(f"{missing[0]} is not in {self.root}; pick shards it lists")
            index = index[np.isin(index[:, 0], keep)]
        self.index = index
        self.targets = index[:, 3].tolist()
        used = sorted(set(index[:, 0].tolist()))
        paths = fetch_all([self.urls[k] for k in used], [shards[k] for k in used], cache_dir)
        self.fds = {k: self.open(k, path, shards[k].get('filesize')) for k, path in zip(used, paths)}

    def open(self, k, path, filesize):
        """A read-only descriptor of shard k at `path`; a missing or truncated shard is one line here, not an error
        deep in a loader worker."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise UsageError(f"shard {redact(self.urls[k])} cannot be opened ({e.strerror}); restore it, or make or "
                             f"index the shards again") from None
        size = os.fstat(fd).st_size
        if filesize is not None and size < filesize:
            os.close(fd)
            raise UsageError(f"shard {redact(self.urls[k])} is truncated: {size} of its {filesize} bytes; restore it, "
                             f"or make or index the shards again")
        return fd

    def __len__(self):
        return len(self.index)

    def name(self, i):
        return f'{redact(self.urls[self.index[i, 0]])}:{i}'

    def read_bytes(self, i):
        """The stored bytes of image i, read at their offset (positioned reads: the descriptors the loader workers
        inherit share no file position)."""
        shard, offset, size, _ = self.index[i].tolist()
        data = os.pread(self.fds[shard], size, offset)
        if len(data) != size:
            raise OSError(f'the shard ends {size - len(data)} bytes early')
        return data

    def __getitem__(self, i):
        try:
            data = self.read_bytes(i)
        except OSError as e:
            raise bad_image(self.name(i), e) from None
        img = load_rgb_bytes(data, self.name(i))
        return (self.transform(img) if self.transform else img), self.targets[i]
