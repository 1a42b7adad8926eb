"""GPU memory and utilisation sampled through NVML in a thread, for gpu_check.py (turbine, a
separate process) and diffusers_ref.py (diffusers, in process): both sides measured the same way.
Stdlib only (pynvml is imported when a sampler starts), so its logic is tested without a GPU."""

import json
import threading
import time
from pathlib import Path


class GpuMemSampler:
    """Device memory in use (NVML, the whole device: what the process really holds, caching
    allocators included), sampled every 20 ms in a thread, so that peaks of a separate process
    (turbine) and of this one (diffusers) are measured the same way. Alongside, NVML's GPU
    utilisation: the share of its last sample period (1/6 s to 1 s) in which a kernel ran. Over
    batches run back to back, well under 100% means the GPU waited for the host (launch
    overhead, host work between batches); close to 100% means the GPU set the pace."""

    def __init__(self, index=0, period=0.02, nvml=None):
        """`nvml`: the pynvml module (imported here by default; a test passes a stand-in)."""
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        self._nvml = nvml
        self._h = nvml.nvmlDeviceGetHandleByIndex(index)
        self.samples = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(period,), daemon=True)
        self.baseline = self.used()

    def used(self):
        return self._nvml.nvmlDeviceGetMemoryInfo(self._h).used

    def utilization(self):
        return self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu

    def _loop(self, period):
        while not self._stop.is_set():
            self.samples.append((time.time(), self.used(), self.utilization()))
            time.sleep(period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def peak(self, t0=None, t1=None):
        """Peak bytes above the baseline taken before the measured process started."""
        vals = [u for t, u, _ in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return (max(vals) - self.baseline) if vals else None

    def busy(self, t0, t1):
        """Mean GPU utilisation (%) of the samples in [t0, t1]; the first second is left out
        when the window is longer than two, since NVML's figure looks back up to a second."""
        return mean_busy(self.samples, t0, t1)

    def dump(self, path):
        Path(path).write_text(json.dumps({"baseline": self.baseline, "samples": self.samples}))


def mean_busy(samples, t0, t1):
    """See `GpuMemSampler.busy`; `samples` are (unix time, bytes used, utilisation %)."""
    if t0 is None or t1 is None or t1 <= t0:
        return None
    start = t0 + 1.0 if t1 - t0 > 2.0 else t0
    vals = [b for t, _, b in samples if start <= t <= t1]
    return sum(vals) / len(vals) if vals else None
