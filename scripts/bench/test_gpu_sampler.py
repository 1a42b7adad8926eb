"""gpu_sampler.py against a stand-in for pynvml: the memory peak and the GPU busy share that
gpu_check.md reports, from samples taken in its thread.

    python3 -m unittest discover -s scripts/bench -p 'test_*.py'
"""

import time
import types
import unittest

import gpu_sampler as gs


def fake_nvml(used, busy):
    """A pynvml stand-in whose memory and utilisation readings come from the callables given."""
    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=used()),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=busy()),
    )


class Sampler(unittest.TestCase):
    def test_the_thread_samples_memory_above_the_baseline_and_utilisation(self):
        readings = iter(range(1000, 10**6, 10))
        s = gs.GpuMemSampler(period=0.005, nvml=fake_nvml(lambda: next(readings), lambda: 80))
        self.assertEqual(s.baseline, 1000)
        t0 = time.time()
        with s:
            time.sleep(0.1)
        t1 = time.time()
        self.assertGreater(len(s.samples), 3)
        # Memory only grows in this stand-in: the peak is the last sample's, above the baseline.
        self.assertEqual(s.peak(), s.samples[-1][1] - 1000)
        self.assertEqual(s.busy(t0, t1), 80)

    def test_busy_is_the_mean_over_the_window_past_its_first_second(self):
        # NVML's figure looks back up to a second: in a window over two seconds long the first
        # second still holds what ran before the window, and is left out.
        samples = [(t / 10, 0, 0 if t < 10 else (100 if t % 2 else 50)) for t in range(0, 40)]
        self.assertEqual(gs.mean_busy(samples, 0.0, 3.9), 75.0)
        # Short windows keep every sample.
        self.assertEqual(gs.mean_busy(samples, 1.0, 1.2), (50 + 100 + 50) / 3)
        self.assertIsNone(gs.mean_busy(samples, 5.0, 6.0))
        self.assertIsNone(gs.mean_busy(samples, 2.0, 1.0))
        self.assertIsNone(gs.mean_busy(samples, None, 1.0))


if __name__ == "__main__":
    unittest.main()
