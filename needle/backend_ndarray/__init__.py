"""Devices and strided arrays: `NDArray` over one small backend module per device."""
from .ndarray import (BackendDevice, NDArray, all_devices, array, cpu, cpu_numpy, cuda, default_device,
                      empty, full)

__all__ = ["BackendDevice", "NDArray", "all_devices", "array", "cpu", "cpu_numpy", "cuda",
           "default_device", "empty", "full"]
