"""Images in webdataset tar shards (`python -m tools.make_shards` writes them): a shared filesystem pays for one open
per shard instead of one per image, and an object store holds no folders.

make_shards writes, per split, `<split>-NNNNNN.tar` shards (`<key>.<ext>` with each file's original bytes and
`<key>.cls` its class index, in the ImageFolder's order, so sample i is the folder's image i), the shard list in
wids' descriptor format (`<split>.json`: url, nsamples and filesize per shard, plus the class names), and an index
(`<split>-index.npy`: shard, byte offset, size and class of every image). A sample is then one positioned read
(os.pread) from its shard at a known offset: no shard is scanned, and each shard is opened once, when the dataset
is made (loader workers inherit the descriptors). Shards named by URL (http(s)://, pipe:, anything webdataset's
gopen opens) are copied into a cache folder once, several at a time, and once per node: the processes that share
a cache take turns per shard (a lock file), each starting at another place in the list. What a random global
order needs is exactly this: wids, whose descriptor format this is, indexes a shard by scanning its headers
whenever its cache of open shards misses, and keeps at most 100 files open per process.
"""
import fcntl
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from util.distributed import get_rank, get_world_size
from util.errors import UsageError
from util.pipeline import load_rgb_bytes

SPLIT_PATTERN = re.compile(r'(?P<split>[A-Za-z0-9_]+)-\d+\.tar$')
FETCH_THREADS = 8  # copies of remote shards under way at once per process (they wait on the network, not the CPU)


def is_shards(data_path):
    """Whether --data_path names shards: a folder holding make_shards' descriptors, a descriptor (.json), or a
    brace pattern or file of .tar shards."""
    if data_path is None:
        return False
    text = str(data_path)
    if text.endswith(('.json', '.tar')) or '{' in text or '://' in text or text.startswith('pipe:'):
        return True
    return Path(text).is_dir() and any(Path(text).glob('*.json')) and any(Path(text).glob('*.tar'))


def is_remote(url):
    return '://' in url and not url.startswith('file://') or url.startswith('pipe:')


def fetch(url, cache_dir):
    """A local path holding `url`: local paths as they are; remote ones copied into cache_dir once. The copy is
    written under a temporary name, then renamed, so an interrupted copy is never taken for a finished one, and
    under a lock on the cache entry, so the processes of a node sharing the cache copy each shard once."""
    if not is_remote(url):
        return url.removeprefix('file://')
    cache = Path(cache_dir or Path.home() / '.cache' / 'mim_shards')
    cache.mkdir(parents=True, exist_ok=True)
    local = cache / re.sub(r'[^A-Za-z0-9._-]', '_', url)[-200:]
    if local.exists():
        return str(local)
    lock_path = local.with_name(f'.{local.name}.lock')
    with open(lock_path, 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process copying it: wait for its copy
        if not local.exists():
            copy(url, local, cache)
        lock_path.unlink(missing_ok=True)  # the copy is there: a process still waiting on this lock finds it
    return str(local)


def copy(url, local, cache):
    import webdataset  # only for remote shards: it opens URLs and pipes (gopen)
    tmp = local.with_name(f'.{local.name}.{os.getpid()}')
    try:
        with webdataset.gopen(url, 'rb') as src, open(tmp, 'wb') as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, local)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot fetch {url} into {cache} ({type(e).__name__}: {e}); check the URL, or "
                         f"pass another --shard_cache") from None


def fetch_all(urls, cache_dir):
    """fetch() of every url, FETCH_THREADS at a time, starting at this process's place in the list (its rank), so
    that the processes of a node copy different shards at once rather than wait on each other's locks."""
    if not any(map(is_remote, urls)):
        return [fetch(u, cache_dir) for u in urls]
    first = get_rank() * len(urls) // get_world_size()
    order = list(range(first, len(urls))) + list(range(first))
    print(f'Fetching {sum(map(is_remote, urls))} remote shard(s) into the cache (those already there are kept)')
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        paths = dict(zip(order, pool.map(lambda k: fetch(urls[k], cache_dir), order)))
    return [paths[k] for k in range(len(urls))]


def join(base, url):
    """A shard's url relative to its descriptor's folder (or URL), as wids resolves it."""
    if '://' in url or url.startswith(('pipe:', '/')):
        return url
    return f'{base.rstrip("/")}/{url}' if base else url


def locate(data_path, split):
    """(descriptor url, names of the shards to read or None for all) of --data_path's `split`."""
    text = str(data_path)
    if text.endswith('.json'):
        return text, None
    if '{' in text or text.endswith('.tar'):
        from braceexpand import braceexpand
        names = [Path(p).name for p in braceexpand(text)]
        found = {m.group('split') for m in map(SPLIT_PATTERN.match, names) if m}
        if len(found) != 1 or any(SPLIT_PATTERN.match(n) is None for n in names):
            raise UsageError(f"--data_path {text}: shards of one split named <split>-NNNNNN.tar, as "
                             f"tools.make_shards writes them, are expected")
        if split != 'train':
            raise UsageError(f"--data_path {text} names train shards only; give the folder of the shards (its "
                             f"train.json and {split}.json) for {split}/")
        return str(Path(text).parent / f'{found.pop()}.json'), set(names)
    descriptor = f'{text.rstrip("/")}/{split}.json'
    if not is_remote(text) and not Path(descriptor).is_file():
        raise UsageError(f"--data_path {text} has no {split}.json: make the shards with python -m tools.make_shards "
                         f"(it writes each split's shard list and index)")
    return descriptor, None


class ShardImages(torch.utils.data.Dataset):
    """One split of make_shards' output, used as the project uses torchvision's ImageFolder: `classes`, `targets`,
    `root`, dataset[i] = (transform(PIL image), target), plus the bytes of image i (`read_bytes`) for the uint8
    pipeline's decoders, and `name(i)` for messages."""

    def __init__(self, data_path, split, transform=None, cache_dir=None):
        url, selected = locate(data_path, split)
        base = url.rsplit('/', 1)[0] if '/' in url else ''
        spec = json.loads(Path(fetch(url, cache_dir)).read_text())
        if 'index' not in spec or 'classes' not in spec:
            raise UsageError(f"{url} is not a shard list written by tools.make_shards (it has no index); make the "
                             f"shards with python -m tools.make_shards")
        self.root, self.classes, self.transform = url, spec['classes'], transform
        shards = spec['shardlist']
        index = np.load(fetch(join(base, spec['index']), cache_dir))  # (N, 4): shard, offset, size, class
        if selected is not None:
            keep = [k for k, s in enumerate(shards) if Path(s['url']).name in selected]
            if len(keep) != len(selected):
                missing = sorted(selected - {Path(shards[k]['url']).name for k in keep})
                raise UsageError(f"{missing[0]} is not in {url}; pick shards it lists")
            index = index[np.isin(index[:, 0], keep)]
        self.index = index
        self.targets = index[:, 3].tolist()
        self.urls = [join(base, s['url']) for s in shards]
        used = sorted(set(index[:, 0].tolist()))
        paths = fetch_all([self.urls[k] for k in used], cache_dir)
        self.fds = {k: self.open(k, path, shards[k]['filesize']) for k, path in zip(used, paths)}

    def open(self, k, path, filesize):
        """A read-only descriptor of shard k at `path`; a missing or truncated shard is one line here, not an error
        deep in a loader worker."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise UsageError(f"shard {self.urls[k]} cannot be opened ({e.strerror}); restore it or make the shards "
                             f"again with python -m tools.make_shards") from None
        size = os.fstat(fd).st_size
        if size < filesize:
            os.close(fd)
            raise UsageError(f"shard {self.urls[k]} is truncated: {size} of its {filesize} bytes; restore it or make "
                             f"the shards again with python -m tools.make_shards")
        return fd

    def __len__(self):
        return len(self.index)

    def name(self, i):
        return f'{self.urls[self.index[i, 0]]}:{i}'

    def read_bytes(self, i):
        """The stored bytes of image i, read at their offset (positioned reads: the descriptors the loader workers
        inherit share no file position)."""
        shard, offset, size, _ = self.index[i].tolist()
        data = os.pread(self.fds[shard], size, offset)
        if len(data) != size:
            raise OSError(f'the shard ends {size - len(data)} bytes early')
        return data

    def __getitem__(self, i):
        img = load_rgb_bytes(self.read_bytes(i), self.name(i))
        return (self.transform(img) if self.transform else img), self.targets[i]
