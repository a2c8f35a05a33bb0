"""Fake CUDA for the tests: run worldsim's code paths on a CPU-only torch as if the device were 'cuda'.

    with fake_cuda() as log:      # torch.cuda.is_available() -> True inside
        world = WorldModel(ae, far, names, device="cuda")
        ...                       # a device mix raises as on a GPU; `log` counts syncs and mixes

The code under test is told device 'cuda' (torch.cuda.is_available() -> True, autocast('cuda')
accepted); every tensor it puts on 'cuda' becomes a FakeTensor on the 'meta' device (shape, dtype,
device; no data). FakeTensorMode propagates devices as CUDA does: an op mixing such a tensor with
a CPU tensor that is not a 0-dim scalar raises FakeTensorDeviceMismatchError. Reads of device data
(.cpu(), .numpy(), .item(), .tolist(), bool()) return zeros and are counted as syncs. A
torch.Generator passed to a random op must be of the op's device (CUDA's own check).
Limits: no real bf16 autocast arithmetic (the CUDA autocast key is not applied to meta tensors),
data-dependent control flow sees zeros.
"""
import collections
import contextlib
import traceback

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

FAKE = FakeTensorMode(allow_non_fake_inputs=True)
LOG = collections.Counter()
VDEV = torch.device("meta")


def _where():
    for fr in reversed(traceback.extract_stack()[:-2]):
        if ("/worldsim/" in fr.filename or "/scripts/" in fr.filename) and "_fake_cuda" not in fr.filename:
            return f"{fr.filename.rsplit('/', 2)[-2]}/{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno}"
    return "?"


class VGen(torch.Generator):
    """A CPU generator that remembers the device it was asked for."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls)
        d = torch.device(device)
        g.vdevice = VDEV if d.type == "cuda" else torch.device("cpu")
        return g

    def __init__(self, device="cpu"):
        pass


def _val(shape, dtype):
    if dtype.is_floating_point:
        n = int(torch.Size(shape).numel())
        return (0.5 + (torch.arange(n) % 7) / 7.0).reshape(shape).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.ones(shape, dtype=dtype)


def _on_dev(x):
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _map(d):
    if d is None:
        return None
    d = torch.device(d)
    return VDEV if d.type == "cuda" else d


RANDOM = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal, torch.multinomial, torch.bernoulli,
          torch.randn_like, torch.rand_like, torch.randint_like}
RANDOM_METHODS = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_"}
CROSS_OK = {"__deepcopy__", "__reduce_ex__", "__setstate__", "__getstate__", "__getitem__", "__setitem__", "copy_", "to", "index_put_", "index_put", "__get__", "__set__"}
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class FakeCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs["device"] = _map(kwargs["device"])
        gen = kwargs.get("generator")
        if gen is not None:
            dev = None
            if func in (torch.randn_like, torch.rand_like, torch.randint_like):
                dev = kwargs.get("device") or args[0].device
            elif func in (torch.normal, torch.multinomial, torch.bernoulli):
                dev = next((a.device for a in args if isinstance(a, torch.Tensor)), kwargs.get("device") or torch.device("cpu"))
            elif func in RANDOM:
                dev = kwargs.get("device") or torch.device("cpu")
            elif name in RANDOM_METHODS:
                dev = args[0].device
            if dev is not None:
                gdev = getattr(gen, "vdevice", torch.device("cpu"))
                if gdev.type != torch.device(dev).type:
                    LOG[f"GENERATOR MISMATCH {name}: generator {gdev} for a tensor on {dev} at {_where()}"] += 1
                    raise RuntimeError(f"Expected a '{'cuda' if torch.device(dev).type == 'meta' else dev}' device "
                                       f"type for generator but found '{'cuda' if gdev.type == 'meta' else gdev.type}'")
                if gdev.type == "meta":
                    kwargs.pop("generator")
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            dev = VDEV if name == "cuda" else None
            rest = list(args[1:]) + [kwargs.get("device")]
            for a in rest:
                if isinstance(a, (str, torch.device)):
                    dev = _map(a)
                elif isinstance(a, torch.Tensor):
                    dev = a.device
            dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
            if dev is not None and dev.type == "cpu" and _on_dev(t):
                LOG[f"sync .to(cpu) at {_where()}"] += 1
                return _val(t.shape, dtype or t.dtype)
            if dev is not None and dev.type == "meta" and not _on_dev(t):
                with FAKE:
                    return torch.empty_like(t, device=VDEV, dtype=dtype or t.dtype)
            if dev is not None:
                args = (t, dev) + tuple(a for a in args[1:] if not isinstance(a, (str, torch.device)))
                kwargs.pop("device", None)
        if name == "cpu" and args and _on_dev(args[0]):
            LOG[f"sync .cpu() at {_where()}"] += 1
            return _val(args[0].shape, args[0].dtype)
        if name in READS and args and _on_dev(args[0]):
            LOG[f"sync .{name}() at {_where()}"] += 1
            return getattr(_val(args[0].shape, args[0].dtype), name)()
        if name in ("__getitem__", "__setitem__") and _on_dev(args[0]):
            idx = args[1]
            def fix(i):
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    if i.dim() != 1:
                        raise RuntimeError("fake-cuda harness: only 1-D boolean masks (assumed all True)")
                    LOG[f"bool-mask index taken as all-True at {_where()}"] += 1
                    return slice(None)
                return i
            idx = tuple(fix(i) for i in idx) if isinstance(idx, tuple) else fix(idx)
            args = (args[0], idx) + tuple(args[2:])
        if name in ("tensor", "as_tensor") and kwargs.get("device") == VDEV:
            real = func(*args, **{**kwargs, "device": "cpu"})
            with FAKE:
                return torch.empty_like(real, device=VDEV)
        leaves = pytree.tree_leaves((args, kwargs))
        if name not in CROSS_OK and not (name.startswith("_") and not name.startswith("__")) and name not in ("set_", "data"):
            devs = {a.device.type for a in leaves if isinstance(a, torch.Tensor) and not (a.device.type == "cpu" and a.dim() == 0)}
            if len(devs) > 1:
                LOG[f"DEVICE MIX in {name}: {sorted(devs)} at {_where()}"] += 1
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices "
                                   f"{sorted('cuda' if d == 'meta' else d for d in devs)} ({name})")
        if any(_on_dev(a) for a in leaves) or kwargs.get("device") == VDEV:
            with FAKE:
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    real_module_to = torch.nn.Module.to

    def module_to(self, *args, **kwargs):
        dev, dtype, _, fmt = torch._C._nn._parse_to(*args, **kwargs)
        if dev is not None and dev.type == "cuda":
            ps = list(self.parameters()) + list(self.buffers())
            if dtype is None and fmt is None and ps and all(_on_dev(p) for p in ps):
                return self
            return real_module_to(self, VDEV, *([dtype] if dtype else []))
        return real_module_to(self, *args, **kwargs)

    patches = [(torch.cuda, "is_available", lambda: True), (torch.cuda, "device_count", lambda: 1),
               (torch.cuda, "synchronize", lambda *a, **k: LOG.update([f"torch.cuda.synchronize at {_where()}"])),
               (torch, "Generator", VGen),
               (torch.cuda, "is_initialized", lambda: False), (torch.cuda, "set_device", lambda *a, **k: None),
               (torch.cuda, "current_device", lambda: 0), (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
               (torch.nn.Module, "to", module_to),
               (torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
               (torch.cuda, "set_rng_state", lambda *a, **k: None),
               (torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)]),
               (torch.cuda, "set_rng_state_all", lambda *a, **k: None),
               (torch.cuda, "manual_seed_all", lambda *a, **k: None), (torch.cuda, "manual_seed", lambda *a, **k: None)]
    old = [(o, n, getattr(o, n)) for o, n, _ in patches]
    for o, n, v in patches:
        setattr(o, n, v)
    LOG.clear()
    try:
        with FakeCuda():
            yield LOG
    finally:
        for o, n, v in old:
            setattr(o, n, v)
