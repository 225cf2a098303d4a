"""Distributed set-up (torchrun, torch.distributed.launch, SLURM; NCCL or gloo), rank-0 printing, DDP wrapping."""
import builtins
import datetime
import gc
import inspect
import os

import torch
import torch.distributed as dist

from util.errors import UsageError


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def silence_non_main(is_main):
    """Only rank 0 prints, unless print(..., force=True)."""
    builtin_print = builtins.print

    def print(*args, force=False, **kwargs):
        if is_main or force:
            now = datetime.datetime.now().strftime('%H:%M:%S')
            builtin_print(f'[{now}]', *args, flush=True, **kwargs)

    builtins.print = print


def init_distributed_mode(args):
    """torchrun / torch.distributed.launch (env RANK, WORLD_SIZE, LOCAL_RANK) or SLURM; NCCL on GPU, gloo on CPU."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank, args.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', max(args.local_rank, 0)))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        args.rank, args.world_size = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
        args.gpu = args.rank % max(1, torch.cuda.device_count())
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        silence_non_main(True)
        return
    args.distributed = True
    use_cuda = args.device.startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    backend = 'nccl' if use_cuda else 'gloo'
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    store, _, _ = next(dist.rendezvous(args.dist_url, rank=args.rank, world_size=args.world_size, timeout=timeout))
    # torchrun --max_restarts keeps one store across restarts: without a prefix per attempt, the restarted ranks
    # would read the addresses of the dead attempt's ranks and fail ('Gloo connectFullMesh failed')
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    dist.init_process_group(backend, store=dist.PrefixStore(f'attempt_{attempt}', store), world_size=args.world_size,
                            rank=args.rank, timeout=timeout)
    silence_non_main(args.rank == 0)
    print(f'distributed init: rank {args.rank}/{args.world_size}, local {args.gpu}, {backend}, {args.dist_url}')
    dist.barrier()


def finish():
    """Leave the process group together: a rank that exits while others still use it can abort. The caller drops
    its DDP wrapper first. A wrapper that outlives the group destroys the group itself when it goes, without
    releasing the GIL; a gloo worker thread that needs the GIL at that moment to free a finished collective's
    tensors then waits forever (seen in 4 of 25 exits on torch 2.11)."""
    if is_dist():
        gc.collect()  # a dropped wrapper may sit in a reference cycle (torch.compile's does)
        dist.barrier()
        dist.destroy_process_group()


DDP = torch.nn.parallel.DistributedDataParallel
# Buffers are not broadcast at each forward (the probe's BatchNorm statistics are, before evaluating:
# broadcast_buffers below). torch 2.14 renamed the flag and warns at every wrapper, so at every FreezeOut event,
# about the old name, which is all that older releases know.
NO_FORWARD_BUFFER_SYNC = ({'forward_sync_buffers': False}
                          if 'forward_sync_buffers' in inspect.signature(DDP.__init__).parameters
                          else {'broadcast_buffers': False})


def wrap_ddp(model, args):
    """DDP over the parameters that are trainable now; rebuilt by the caller when that set changes."""
    if not args.distributed:
        return model
    ids = [args.gpu] if args.device.startswith('cuda') else None
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **NO_FORWARD_BUFFER_SYNC)


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')  # those that replay CUDA graphs (on CUDA only)
COMPILE_SCOPES = ('model', 'blocks')


def add_compile_arg(parser, what='the model'):
    """--compile [MODE] and --compile_scope, as the entry points and benchmarks share them: plain --compile is
    torch.compile's default mode."""
    parser.add_argument('--compile', nargs='?', const='default', choices=COMPILE_MODES, metavar='MODE',
                        help=f'torch.compile {what} in torch.compile\'s MODE (default: default): one of %(choices)s; '
                             'reduce-overhead replays the compiled forward and backward as CUDA graphs, so that the '
                             'host does not launch their kernels one by one')
    parser.add_argument('--compile_scope', choices=COMPILE_SCOPES,
                        help='what --compile compiles: model (one graph of the whole forward and backward; a FreezeOut '
                             'event changes what trains, so it compiles the model anew) or blocks (each encoder block, '
                             'decoder and the HOG target on its own, the encoder\'s blocks sharing one compiled graph: '
                             'a FreezeOut event compiles at most a frozen variant of a block, once in a run). Default: '
                             'blocks with --freezeout (model with the CUDA-graph modes, which capture the whole step), '
                             'model otherwise')


def compile_scope(args, freezeout=False):
    """--compile_scope, or its default (see add_compile_arg)."""
    if args.compile_scope:
        return args.compile_scope
    return 'blocks' if freezeout and args.compile not in CUDA_GRAPH_MODES else 'model'


def compile_model(model, mode, scope, dynamic=None):
    """torch.compile in `mode`: the whole model (returns the compiled wrapper), or with scope 'blocks' each of
    model.compile_regions() in place (returns `model`). Compiled graphs are cached per Python function, so the
    encoder's identical blocks share theirs; a region compiled before is left as it is, since compiling it again
    would discard them. Regions always get static shapes: MAE's encoder and decoder blocks share one function
    but not their sizes, and a second size would otherwise make the graphs symbolic in it."""
    if scope == 'model':
        return torch.compile(model, mode=mode, dynamic=dynamic)
    if not hasattr(model, 'compile_regions'):
        raise UsageError(f"--compile_scope blocks: {type(model).__name__} compiles as one model; "
                         f"use --compile_scope model")
    if mode in CUDA_GRAPH_MODES:
        raise UsageError(f"--compile {mode} captures the whole step as CUDA graphs: use --compile_scope model")
    for region in model.compile_regions():
        if region._compiled_call_impl is None:
            region.compile(mode=mode, dynamic=False)
    return model


def wrap_for_training(model, args):
    """DDP when distributed, then torch.compile in --compile's mode and scope (the model scope compiles the DDP
    wrapper, as torch advises; the blocks scope compiles parts of the model inside it)."""
    ddp = wrap_ddp(model, args)
    if not args.compile:
        return ddp
    scope = compile_scope(args, args.freezeout)
    print(f'torch.compile ({args.compile}, {scope}): the next steps compile ' +
          ('the model' if scope == 'model' else 'each block in the variants not compiled before'))
    if scope == 'blocks':
        compile_model(model, args.compile, scope)
        return ddp
    # Each FreezeOut event changes which parameters train, and so the graph; the earlier graphs never run again,
    # and past torch._dynamo's recompile limit (8 graphs) the model would run eager for the rest of the run.
    # Dropping them keeps one graph (and one CUDA graph pool) alive; kernels come from the on-disk cache.
    torch.compiler.reset()
    return compile_model(ddp, args.compile, scope)


def broadcast_buffers(model):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if is_dist():
        for b in model.buffers():
            dist.broadcast(b, 0)


def all_reduce_mean(x):
    if not is_dist():
        return x
    t = torch.tensor(x, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t)
    return (t / get_world_size()).item()
