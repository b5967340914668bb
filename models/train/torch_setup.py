"""The one torch set-up of the training scripts (train_dialogue.py, train_nat.py): threads and the device."""

import os

import torch


def setup_torch(threads, device):
    """torch.set_num_threads(threads), one inter-op thread, and the device: "auto" is cuda when one is
    available, else cpu; on cuda the deterministic settings (cuBLAS workspace, deterministic algorithms,
    no TF32, no cuDNN benchmarking). @return the torch.device."""
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:  # a second call aborts the process (in-process reruns)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    name = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)
