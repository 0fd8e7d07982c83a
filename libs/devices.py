"""`--device` values checked before any work: a name torch does not know, or a device this machine lacks, is a
one-line user error (BadInput) instead of a torch traceback at the first tensor moved there."""
import torch

from libs.errors import BadInput

DEVICE_TYPES = ("cpu", "cuda", "mps")  # the device types the entry scripts run on


def cuda_count() -> int:
    """Number of CUDA devices this process can use (0 without a driver or a CUDA build of torch)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(name, flag: str = "--device") -> torch.device:
    """The torch.device `name` names ('cpu', 'cuda', 'cuda:N', 'mps'; None: cuda when available, else cpu),
    checked to exist on this machine.

    Raises BadInput naming `flag`, the value and what is allowed for an unknown name ('gpu'), another device
    type, a CUDA device without a usable GPU or beyond the GPUs there are ('cuda:99'), and 'mps' where torch has
    no MPS backend.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(str(name).strip())
    except (RuntimeError, ValueError, TypeError):
        raise BadInput(f"{flag} {name!r} is not a device name (use {allowed})") from None
    if device.type not in DEVICE_TYPES:
        raise BadInput(f"{flag} {name}: device type '{device.type}' is not supported here (use {allowed})")
    if device.type == "cuda":
        n = cuda_count()
        if n == 0:
            raise BadInput(f"{flag} {name}: no usable CUDA GPU on this machine (torch {torch.__version__}, "
                           f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= n:
            raise BadInput(f"{flag} {name}: this machine has {n} CUDA device(s), "
                           f"{'cuda:0' if n == 1 else f'cuda:0 to cuda:{n - 1}'}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"{flag} {name}: the MPS backend is not available on this machine (use cpu or cuda)")
    if device.type == "cpu" and device.index not in (None, 0):
        raise BadInput(f"{flag} {name}: there is one CPU device, cpu (or cpu:0)")
    return device
