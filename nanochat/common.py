"""
What every stage shares: user errors, logging, files, device and dtype choice, torch.distributed, peak FLOPs.
Nothing runs at import (no logging setup, CUDA probe or mkdir): scripts call these from their `main()`.
"""

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Errors a user can fix, and how scripts report them


class UserError(Exception):
    """A problem the user can fix, whose one-line message names it and the fix; `script_main` prints just that."""


class ConfigError(UserError, ValueError):
    """A flag or environment variable with a value that can't work."""


def add_runtime_flags(group, seed_help="seed of torch's generators"):
    """--run (wandb), --device-type, --seed and --debug: the runtime flags of every training script."""
    group.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    group.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    group.add_argument("--seed", type=int, default=42, help=seed_help)
    return add_debug_flag(group)


def add_debug_flag(parser):
    """--debug: show the full traceback of a user error instead of the one-line message."""
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback (also NANOCHAT_DEBUG=1)")
    return parser


def script_main(name):
    """Decorator for a script's `main(argv=None)`: a UserError exits 1 with one line (--debug: the traceback)."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv=None):
            args = sys.argv[1:] if argv is None else list(argv)
            debug = "--debug" in args or os.environ.get("NANOCHAT_DEBUG") == "1"
            try:
                return main(argv)
            except (UserError, KeyboardInterrupt) as err:
                if debug:
                    raise
                compute_cleanup()  # tear the process group down so no other rank waits in a collective
                why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"error: {' '.join(str(err).split())}"
                raise SystemExit(f"{name}: {why}") from None

        return run

    return decorate


def strict_json(obj, **kwargs):
    """json.dumps that writes NaN / inf as null: the output is strict JSON that every parser accepts."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


# -----------------------------------------------------------------------------
# Logging and printing


class _ColorFormatter(logging.Formatter):
    """Colour the level name when writing to a terminal; plain text otherwise."""

    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[35m"}

    def __init__(self, fmt, use_color):
        super().__init__(fmt)
        self.use_color = use_color

    def format(self, record):
        if self.use_color and record.levelname in self.COLORS:
            record = logging.makeLogRecord(record.__dict__)
            record.levelname = f"{self.COLORS[record.levelname]}{record.levelname}\033[0m"
        return super().format(record)


def setup_default_logging(level=logging.INFO):
    """Configure the root logger once: timestamped, coloured on a tty, rank-aware (only rank 0 says INFO)."""
    root = logging.getLogger()
    if any(getattr(h, "_nanochat", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ColorFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s", sys.stderr.isatty()))
    handler._nanochat = True
    root.addHandler(handler)
    # Non-zero ranks only report warnings and errors: N copies of every line help nobody.
    root.setLevel(level if get_dist_info()[1] == 0 else max(level, logging.WARNING))


def print_banner():
    banner = r"""
                                                   __          __
   ____   ____ _   ____   ____   _____ / /_   ____ _  / /_
  / __ \ / __ `/  / __ \ / __ \ / ___// __ \ / __ `/ / __/
 / / / // /_/ /  / / / // /_/ // /__ / / / // /_/ / / /_
/_/ /_/ \__,_/  /_/ /_/ \____/ \___//_/ /_/ \__,_/  \__/
"""
    if int(os.environ.get("RANK", 0)) == 0:
        print(banner)


# -----------------------------------------------------------------------------
# Files


def get_base_dir():
    """Where nanochat keeps data, tokenizer, checkpoints and reports: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


@contextlib.contextmanager
def _atomic_file(path, mode):
    # A temp file beside `path` (same filesystem, so the rename is atomic), renamed over it only on success.
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: give it the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, data):
    """Write bytes or str to `path` so that a crash leaves either the old file or the new one, never half."""
    with _atomic_file(path, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
        f.write(data)


def atomic_torch_save(obj, path):
    """torch.save with the same all-or-nothing guarantee as `atomic_write`."""
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def download_file_with_lock(url, filename, postprocess_fn=None, desc=None):
    """Download `url` to <base_dir>/<filename> once (other ranks wait on a file lock); RuntimeError if unreachable."""
    import requests
    from filelock import FileLock
    from tqdm import tqdm

    path = os.path.join(get_base_dir(), filename)
    with FileLock(path + ".lock"):
        if os.path.exists(path):
            return path
        logger.info("Downloading %s", url)
        try:
            with requests.get(url, stream=True, timeout=30) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length", 0)) or None
                tmp = path + ".tmp"  # an interrupted transfer never looks finished
                with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=desc or filename) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except requests.RequestException as e:
            raise RuntimeError(f"could not download {url} ({type(e).__name__}: {e}); check the network, or place the file at {path} by hand") from e
        os.replace(tmp, path)
        if postprocess_fn is not None:
            postprocess_fn(path)
    return path


# -----------------------------------------------------------------------------
# Devices and dtypes


# The oldest Linux driver each CUDA major version runs on (CUDA's minor-version compatibility): a torch
# build for CUDA 12.x needs 525.60.13 or newer, one for CUDA 13.x needs 580.65.06 or newer.
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}
NVIDIA_PROC_VERSION = "/proc/driver/nvidia/version"


def nvidia_driver():
    """The NVIDIA driver version when this machine shows an NVIDIA GPU ("unknown" when nothing says which), else None."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        versions = [line.strip() for line in out.splitlines() if re.fullmatch(r"\d+(\.\d+)+", line.strip())]
        if versions:
            return versions[0]
    try:  # the kernel module is loaded even where nvidia-smi is missing or broken
        with open(NVIDIA_PROC_VERSION) as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", f.read())
        return found.group(1) if found else "unknown"
    except OSError:
        return None


def unusable_gpu_problem():
    """One line naming why torch can't use this machine's NVIDIA GPU, with the fix; None when it can or there is none."""
    if torch.cuda.is_available():
        return None
    driver = nvidia_driver()
    if driver is None:
        return None
    cuda = torch.version.cuda
    base = torch.__version__.split("+")[0]
    fix = (f"upgrade the NVIDIA driver, or install a torch build for your driver's CUDA: "
           f"`uv pip install --torch-backend=auto torch=={base}` and run with UV_NO_SYNC=1 "
           "(the GPU scripts do this with TORCH_BACKEND=auto; see README, GPU drivers)")
    if cuda is None:
        return (f"this machine has an NVIDIA GPU (driver {driver}) but torch {torch.__version__} is a CPU-only build; "
                f"{fix.replace('upgrade the NVIDIA driver, or install', 'install')}")
    need = MIN_DRIVER.get(int(cuda.split(".")[0]))
    needs = f" (that needs driver >= {need})" if need else ""
    return (f"this machine has an NVIDIA GPU (driver {driver}) but torch {torch.__version__}, built for CUDA "
            f"{cuda}{needs}, cannot use it; {fix}")


def require_cuda(what):
    """Raise ConfigError unless torch can use a CUDA GPU, which `what` (a script, a flag) needs."""
    if torch.cuda.is_available():
        return
    problem = unusable_gpu_problem()
    raise ConfigError(f"{what}: {problem}" if problem else
                      f"{what}: PyTorch sees no CUDA device and this machine shows no NVIDIA GPU (no nvidia-smi, "
                      "no driver); use --device-type cpu (or runcpu.sh)")


def autodetect_device_type():
    """cuda if available, else mps, else cpu."""
    problem = unusable_gpu_problem()
    if problem and get_dist_info()[3] > 1:  # N CPU ranks on a GPU machine would look like a hung GPU run
        raise ConfigError(problem)
    if problem:
        logger.warning("Running on the CPU: %s", problem)
    device_type = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    logger.info("Autodetected device type: %s", device_type)
    return device_type


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16():
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 matmuls beat fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    flags = set(flags.split())
    return "amx_bf16" in flags or "avx512_bf16" in flags


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@functools.lru_cache(maxsize=1)
def get_compute_dtype():
    """(dtype, reason): the activation/matmul dtype of training, once per process ($NANOCHAT_DTYPE wins); weights stay fp32."""
    env = os.environ.get("NANOCHAT_DTYPE")
    if env:
        if env not in _DTYPES:
            raise ConfigError(f"NANOCHAT_DTYPE={env!r} is not a supported dtype; set it to one of {', '.join(_DTYPES)} "
                              "or unset it to let nanochat choose")
        return _DTYPES[env], f"set via NANOCHAT_DTYPE={env}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        if major >= 8:  # older GPUs: fp32, since fp16 needs a GradScaler (opt in)
            return torch.bfloat16, f"auto-detected: CUDA SM {major}{minor} (bf16 supported)"
        return torch.float32, f"auto-detected: CUDA SM {major}{minor} (pre-Ampere, bf16 not supported; fp16 is opt-in via NANOCHAT_DTYPE)"
    # CPU and MPS: fp32. Even a CPU with native bf16 (AVX512-BF16 / AMX, ~1.7x faster per token) trained a d4
    # run 3.3% worse and unevenly across seeds; without native bf16 it is ~200x slower. Opt in after checking
    # the curve with bench/bench_precision_cpu.py on that machine.
    if torch.backends.mps.is_available():
        return torch.float32, "auto-detected: MPS (bf16 is opt-in via NANOCHAT_DTYPE=bfloat16)"
    if cpu_has_native_bf16():
        return torch.float32, "CPU default (this CPU has native bf16, which is opt-in via NANOCHAT_DTYPE=bfloat16)"
    return torch.float32, "CPU default (this CPU has no native bf16)"


def get_inference_dtype(device_type):
    """The dtype to generate / evaluate in on `device_type` ($NANOCHAT_DTYPE wins)."""
    if os.environ.get("NANOCHAT_DTYPE") or device_type == "cuda":
        return get_compute_dtype()[0]
    # Decode is dominated by small ops: batch 1-32 on a depth-4 model ran 2.3x slower in bf16 than fp32, even with AMX.
    return torch.float32


# -----------------------------------------------------------------------------
# Distributed


def is_ddp_initialized():
    return dist.is_available() and dist.is_initialized()


def dist_world_size():
    """Ranks in the process group, 1 without one: `if dist_world_size() > 1:` guards every collective."""
    return dist.get_world_size() if is_ddp_initialized() else 1


def usable_cores():
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):  # Linux only; os.cpu_count() ignores taskset/cgroups
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the torchrun environment; (False, 0, 0, 1) without it."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):  # launched by torchrun
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type="cuda", seed=42):
    """Seed, pick the device, join the process group (NCCL on CUDA, else gloo): (ddp, rank, local_rank, world_size, device)."""
    # Expandable segments: batches of varying size (evaluation, RL sampling, the batch probe) reuse freed memory
    # instead of fragmenting it. Read when CUDA initialises, so it is set first, for every stage.
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    if device_type not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"unknown device type {device_type!r}; use --device-type cuda, mps or cpu (or leave it empty to autodetect)")
    if device_type == "cuda":
        require_cuda("--device-type cuda")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device-type mps was asked for but MPS is not available; use --device-type cpu")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul that remains
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not is_ddp_initialized():
            dist.init_process_group(backend="nccl", device_id=device)
            dist.barrier()
    else:
        device = torch.device(device_type)
        if ddp and device_type == "cpu" and not is_ddp_initialized():
            dist.init_process_group(backend="gloo")
    if rank == 0:
        logger.info("Distributed world size: %d", world_size)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if is_ddp_initialized():
        dist.destroy_process_group()


class DummyWandb:
    """Stand-in for a wandb run when logging is off (`--run dummy`)."""

    def log(self, *args, **kwargs):
        pass

    finish = log


# -----------------------------------------------------------------------------
# Peak FLOPs and bandwidth, for MFU / MBU. Keyed by a card's whole model identity (_model_key), never a
# substring: "RTX A4000" can't reach "a40", and a variant missing here (a laptop part, a MIG slice) is unknown.

# Dense bf16 tensor-core FLOP/s (spec sheet, sparsity halved); fp16 where the card has no bf16 (V100, T4).
# GeForce cards run bf16 with fp32 accumulate at half their fp16-accumulate rate: that half rate is what
# training gets and what is listed (SMs x 512 FLOP/clock x boost clock, from NVIDIA's whitepapers).
_PEAK_FLOPS = {
    # Blackwell, Hopper (the SXM parts report no form factor: "NVIDIA H100 80GB HBM3")
    "gb200": 2.5e15, "b200": 2.25e15, "b100": 1.75e15,
    "h200": 989e12, "h200 sxm": 989e12, "h200 nvl": 835e12, "gh200": 989e12,
    "h100": 989e12, "h100 sxm": 989e12, "h100 pcie": 756e12, "h100 nvl": 835e12,
    "h800": 989e12, "h800 sxm": 989e12, "h800 pcie": 756e12,
    # Ampere datacenter (A100 40/80 GB, SXM and PCIe all run 312 TFLOP/s)
    "a100": 312e12, "a100 sxm": 312e12, "a100 pcie": 312e12, "a800": 312e12, "a800 sxm": 312e12, "a800 pcie": 312e12,
    "a30": 165e12, "a40": 149.7e12, "a10": 125e12, "a10g": 70e12,
    # Ada datacenter
    "l40s": 362e12, "l40": 181e12, "l4": 121e12,
    # Workstation (Ampere, Ada): full-rate fp32 accumulate
    "rtx a2000": 31.9e12, "rtx a4000": 76.7e12, "rtx a4500": 94.6e12, "rtx a5000": 111.1e12, "rtx a6000": 154.8e12,
    "rtx 6000 ada": 364.2e12,
    # GeForce RTX 30 (Ampere)
    "rtx 3060": 25.5e12, "rtx 3060 ti": 32.4e12, "rtx 3070": 40.6e12, "rtx 3070 ti": 43.5e12,
    "rtx 3080": 59.5e12, "rtx 3080 ti": 68.2e12, "rtx 3090": 71.2e12, "rtx 3090 ti": 80.0e12,
    # GeForce RTX 40 (Ada)
    "rtx 4060": 30.2e12, "rtx 4060 ti": 44.1e12, "rtx 4070": 58.3e12, "rtx 4070 super": 71.0e12,
    "rtx 4070 ti": 80.2e12, "rtx 4070 ti super": 88.2e12, "rtx 4080": 97.5e12, "rtx 4080 super": 104.4e12,
    "rtx 4090": 165.2e12,
    # GeForce RTX 50 (Blackwell)
    "rtx 5060": 38.4e12, "rtx 5060 ti": 47.4e12, "rtx 5070": 61.7e12, "rtx 5070 ti": 87.9e12,
    "rtx 5080": 112.6e12, "rtx 5090": 209.5e12,
    # Volta, Turing (fp16 tensor cores)
    "v100": 125e12, "v100 sxm": 125e12, "v100 pcie": 112e12, "v100s pcie": 130e12, "t4": 65e12,
    # AMD Instinct (dense bf16 matrix cores)
    "mi355x": 2.5e15, "mi325x": 1.3074e15, "mi300x": 1.3074e15, "mi300a": 980.6e12, "mi250x": 383e12, "mi250": 362.1e12,
}

# Memory bandwidth, bytes/s (spec sheets); A100/A800 at their 80 GB parts' ~2.0 TB/s (40 GB: 1.56 TB/s).
_PEAK_BANDWIDTH = {
    "gb200": 8.0e12, "b200": 8.0e12, "b100": 8.0e12,
    "h200": 4.8e12, "h200 sxm": 4.8e12, "h200 nvl": 4.8e12,
    "h100": 3.35e12, "h100 sxm": 3.35e12, "h100 pcie": 2.0e12, "h100 nvl": 3.9e12,
    "h800": 3.35e12, "h800 sxm": 3.35e12, "h800 pcie": 2.0e12,
    "a100": 2.0e12, "a100 sxm": 2.0e12, "a100 pcie": 2.0e12, "a800": 2.0e12, "a800 sxm": 2.0e12, "a800 pcie": 2.0e12,
    "a30": 933e9, "a40": 696e9, "a10": 600e9, "a10g": 600e9,
    "l40s": 864e9, "l40": 864e9, "l4": 300e9,
    "rtx a4000": 448e9, "rtx a5000": 768e9, "rtx a6000": 768e9, "rtx 6000 ada": 960e9,
    "rtx 3060": 360e9, "rtx 3070": 448e9, "rtx 3080": 760e9, "rtx 3080 ti": 912e9, "rtx 3090": 936e9, "rtx 3090 ti": 1.01e12,
    "rtx 4060": 272e9, "rtx 4060 ti": 288e9, "rtx 4070": 504e9, "rtx 4070 super": 504e9, "rtx 4070 ti": 504e9,
    "rtx 4070 ti super": 672e9, "rtx 4080": 717e9, "rtx 4080 super": 736e9, "rtx 4090": 1.01e12,
    "rtx 5070": 672e9, "rtx 5070 ti": 896e9, "rtx 5080": 960e9, "rtx 5090": 1.79e12,
    "v100": 900e9, "v100 sxm": 900e9, "v100 pcie": 900e9, "t4": 320e9,
    "mi355x": 8.0e12, "mi325x": 6.0e12, "mi300x": 5.3e12, "mi300a": 5.3e12, "mi250x": 3.28e12, "mi250": 3.28e12,
}

# Words in front of the model name; dropped only while they lead.
_BRAND_WORDS = ("nvidia", "geforce", "tesla", "amd", "instinct")
# Words anywhere that don't change the chip's rates: memory size ("80gb"), memory type ("hbm3"),
# "Generation" (RTX 6000 Ada Generation), "VF" (a virtual function of the same AMD card in a VM).
_NOISE = re.compile(r"\d+gb|hbm\d*e?|generation|vf")


def _model_key(device_name):
    """The model identity of a device name, as the peak tables key it: "NVIDIA A100-SXM4-80GB" -> "a100 sxm"."""
    words = device_name.lower().replace("-", " ").replace("_", " ").split()
    while words and words[0] in _BRAND_WORDS:
        words.pop(0)
    words = ["sxm" if re.fullmatch(r"sxm\d*", w) else w for w in words if not _NOISE.fullmatch(w)]
    return " ".join(words)


_warned_unknown = set()


def get_peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU by its torch.cuda.get_device_name(); None (logged once) when unknown."""
    peak = _PEAK_FLOPS.get(_model_key(device_name))
    if peak is None and device_name not in _warned_unknown:
        _warned_unknown.add(device_name)
        logger.warning("Peak FLOPs unknown for %r (model %r): MFU will be shown as n/a (add it to nanochat/common.py)",
                       device_name, _model_key(device_name))
    return peak


def get_peak_bandwidth(device_name):
    """Memory bandwidth in bytes/s of a GPU by its device name, or None when unknown."""
    return _PEAK_BANDWIDTH.get(_model_key(device_name))


def measure_matmul_flops(device, dtype, n=1024, seconds=0.5):
    """Square-matmul FLOP/s on `device` in `dtype`, from the fastest of the products made in `seconds`: the CPU's
    practical peak, for a CPU MFU."""
    # A private generator: training scripts measure between seeding and init_weights(), and drawing from the
    # global one shifted every init, so `--seed 42` did not give the weights that seed gives everywhere else.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = getattr(torch, device.type).synchronize
    for _ in range(3):
        a @ b
    # The fastest product, not the mean: a moment of load from another program (a test run, a browser) during
    # the probe would lower the peak and put the whole run's MFU above 100%.
    fastest, stop = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        fastest = min(fastest, time.perf_counter() - t0)
        if t0 >= stop:
            return 2 * n**3 / fastest
