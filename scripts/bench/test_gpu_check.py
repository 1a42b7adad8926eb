"""Unit tests of gpu_check.py's logic and report, on made-up figures: the GPU run is one try, so
every branch of the table it writes (fallback to candle's ops, failures, targets met and not,
compile rows, memory, profiles) must work before it runs. The dry run (`scripts/gpu_check.sh
--dry-run`) covers the flow end to end on the CPU; this covers what a CPU run cannot reach.

    python3 -m unittest discover -s scripts/bench -p 'test_*.py'
"""

import argparse
import os
import stat
import tempfile
import unittest
from pathlib import Path

import gpu_check as g

HERE = Path(__file__).resolve().parent


def row(batch, ips, peak=None, latency=None):
    r = {"batch": batch, "images_per_s": ips, "median_s": batch / ips, "ms_per_image": 1e3 / ips,
         "text_encode_ms": 1.0, "unet_ms": 2.0, "vae_decode_ms": 3.0}
    if peak is not None:
        r["peak_bytes"] = peak
    if latency is not None:
        r["latency_s"] = latency
    return r


def fake_tests(d, script):
    """A stand-in kernel-test binary `ops` in folder d: a bash script answering like libtest."""
    fake = Path(d) / "ops"
    fake.write_text(script if script.endswith("\n") else script + "\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)


def args(**kw):
    a = argparse.Namespace(device="cuda", kernels="auto", commit="abc", budget_s=480.0, size="512x512",
                           steps=1, dtype="bf16", min_time=2.0, config_dir=Path("models/sdxl-turbo"),
                           tests_dir=Path("/tmp/tests"))
    for k, v in kw.items():
        setattr(a, k, v)
    return a


class ConvPlans(unittest.TestCase):
    def test_summary_counts_the_weighed_shapes_and_the_graph_wins(self):
        self.assertIsNone(g.conv_plan_summary(None))
        self.assertIsNone(g.conv_plan_summary([]))
        key = "BF16 NHWC x[n=8 c=128 h=512 w=512] o=128 k=3x3 pad=1 stride=1 residual=false"
        plans = [
            f"{key} mode=Measure graph=true: Graph engine 12 (mode A #0) workspace 0 KiB (legacy ...)",
            f"{key} mode=Measure graph=true: Fused CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM ...",
            f"{key} mode=Measure graph=false: Prefill CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM ...",
            f"{key} mode=Measure graph=true: graph plan engine 12 (mode A #0) failed, legacy from now on: x",
            f"{key} mode=Measure graph=false: fallback to candle's ops: the plan's first call failed: x",
        ]
        line = g.conv_plan_summary(plans)
        self.assertTrue(line.startswith("cuDNN plans: 3 built; graph-API engines weighed for 2, faster than "
                                        "the legacy algorithm (so chosen) for 1; 1 graph plan(s) failed"), line)
        self.assertIn("; 1 plan(s) failed at their first call (candle's ops from then on)", line)
        self.assertNotIn("sub-batches", line)
        self.assertNotIn("dropped", line)
        plans += [
            f"{key} mode=Measure graph=true: in sub-batches of 4 (implicit precomputed GEMM asks ...)",
            f"{key} mode=Measure graph=false: plan dropped, least recently used (limit 4096)",
        ]
        line = g.conv_plan_summary(plans)
        self.assertTrue(line.startswith("cuDNN plans: 3 built;"), line)
        self.assertIn("; 1 batch shape(s) run in sub-batches; 1 plan(s) dropped over the limit", line)


class Levers(unittest.TestCase):
    def test_tests_map_to_levers_first_pattern_wins(self):
        self.assertEqual(g.lever_of("group_norm_channels_last_matches_composition"), "channels-last")
        self.assertEqual(g.lever_of("group_norm_matches_composition"), "group-norm")
        self.assertEqual(g.lever_of("multi_head_attention_takes_flash_path_when_it_applies"), "flash")
        self.assertEqual(g.lever_of("fused_attention_in_chunks_matches_composition"), "attention")
        self.assertEqual(g.lever_of("conv2d_cuda_matches_cpu_reference"), "conv")
        self.assertEqual(g.lever_of("stream_order_copy_back_waits_for_its_bytes"), "stream-order")
        self.assertEqual(g.lever_of("to_rgb8_matches_composition"), "postprocess")
        self.assertEqual(g.lever_of("copy_to_host_returns_the_bytes_of_each_copy"), "overlap")
        self.assertEqual(g.lever_of("upsample_conv_phases_match_upsample_then_conv"), "upsample-conv")
        self.assertEqual(g.lever_of("interleave_phases_equals_composition"), "upsample-conv")
        self.assertEqual(g.lever_of("conv_graph_cuda_matches_cpu_reference"), "conv-graph")
        self.assertEqual(g.lever_of("conv2d_cuda_matches_cpu_reference"), "conv")
        self.assertEqual(g.lever_of("stream_order_copy_back_waits_for_its_bytes"), "stream-order")
        self.assertEqual(g.lever_of("upsample_nearest2x_channels_last_matches_candle"), "channels-last")
        self.assertIsNone(g.lever_of("something_else"))

    def test_libtest_lines_are_parsed(self):
        out = g.libtest_results("running 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... ignored\n"
                                "a: test\ntest result: FAILED. 1 passed; 1 failed\n")
        self.assertEqual(out, {"a": "ok", "b": "FAILED", "c": "ignored"})

    def test_a_test_that_never_finished_is_started(self):
        out = g.libtest_results("running 3 tests\ntest a ... ok\ntest b ... \n")
        self.assertEqual(out, {"a": "ok", "b": "started"})

    def test_a_hung_test_fails_its_lever_and_the_unreached_keep_theirs(self):
        hung = "\n".join([
            "#!/usr/bin/env bash",
            'case "${1:-}" in',
            "    --list) for t in group_norm_matches_composition geglu_matches_composition "
            "to_rgb8_matches_composition; do echo \"$t: test\"; done; exit 0 ;;",
            "esac",
            'echo "running 3 tests"',
            'echo "test group_norm_matches_composition ... ok"',
            'echo "test geglu_matches_composition ... "',
            "exit 124",
        ])
        with tempfile.TemporaryDirectory() as d:
            fake_tests(d, hung)
            # No time left to rerun: the unreached test is not run, not failed.
            res = g.kernel_tests(Path(d), g.Budget(300))
        self.assertEqual(res["failed"], ["geglu_matches_composition"])
        self.assertEqual(res["not_run"], ["to_rgb8_matches_composition"])
        self.assertEqual(res["levers"], ["geglu"])
        self.assertIn("never ran (no time): to_rgb8_matches_composition", res["summary"])

    def test_auto_kernels_leave_out_failed_levers(self):
        self.assertEqual(g.sweep_kernels("auto", []), "all")
        self.assertEqual(g.sweep_kernels("auto", ["conv", "flash"]), "all,-conv,-flash")
        self.assertEqual(g.sweep_kernels("all,-flash", ["conv"]), "all,-flash")

    def test_kernel_tests_rerun_failures_alone(self):
        with tempfile.TemporaryDirectory() as d:
            fake_tests(d, (HERE / "fake_libtest.sh").read_text())
            budget = g.Budget(10_000)
            res = g.kernel_tests(Path(d), budget)
        self.assertEqual(res["failed"], ["geglu_matches_composition"])
        self.assertEqual(res["victims"], ["conv2d_cuda_matches_cpu_reference"])
        self.assertEqual(res["levers"], ["geglu"])
        self.assertIn("0 of 1 test binaries passed", res["summary"])

    def test_a_short_run_reserves_less_for_the_measuring(self):
        # A 270 s run (GPU_CHECK_ARGS="--tests-reserve-s 170 ..."): the failures are still rerun
        # alone, where the default reserve of 300 s would leave no time for it.
        with tempfile.TemporaryDirectory() as d:
            fake_tests(d, (HERE / "fake_libtest.sh").read_text())
            short = g.kernel_tests(Path(d), g.Budget(270), reserve_s=170)
            default = g.kernel_tests(Path(d), g.Budget(270))
        self.assertEqual(short["failed"], ["geglu_matches_composition"])
        self.assertEqual(short["victims"], ["conv2d_cuda_matches_cpu_reference"])
        self.assertEqual(short["not_rerun"], [])
        self.assertEqual(sorted(default["not_rerun"]),
                         ["conv2d_cuda_matches_cpu_reference", "geglu_matches_composition"])
        self.assertEqual(default["levers"], ["conv", "geglu"])

    def test_reruns_stop_when_their_time_is_spent(self):
        # Every test fails, and each rerun takes a second and fails again (one cause for all):
        # the reruns stop after their 2.5 s, and the tests left without one count as failed.
        every = "\n".join([
            "#!/usr/bin/env bash",
            "tests=(group_norm_matches_composition geglu_matches_composition to_rgb8_matches_composition "
            "flash_attention_matches_reference upsample_conv_phases_match_upsample_then_conv "
            "bias_residual_matches_composition)",
            'case "${1:-}" in',
            '    --list) for t in "${tests[@]}"; do echo "$t: test"; done; exit 0 ;;',
            '    --exact) echo "$2" >> "$(dirname "$0")/reruns"; sleep 1; echo "test $2 ... FAILED"; exit 101 ;;',
            "esac",
            'for t in "${tests[@]}"; do echo "test $t ... FAILED"; done',
            "exit 101",
        ])
        with tempfile.TemporaryDirectory() as d:
            fake_tests(d, every)
            res = g.kernel_tests(Path(d), g.Budget(10_000), rerun_s=2.5)
            reruns = (Path(d) / "reruns").read_text().split()
        self.assertEqual(len(res["failed"]), 6)
        self.assertEqual(res["victims"], [])
        self.assertTrue(2 <= len(reruns) <= 3, reruns)
        self.assertEqual(res["not_rerun"], res["failed"][len(reruns):])
        self.assertRegex(res["summary"], r"failed, not rerun alone \(no time\): [a-z_, ]*bias_residual_matches_composition")
        self.assertEqual(res["levers"], sorted({"group-norm", "geglu", "postprocess", "flash",
                                                "upsample-conv", "bias-residual"}))

    def test_compile_starts_where_the_peaks_are(self):
        res = {"eager": {"rows": [row(8, 50), row(16, 40)]}, "turbine": {"rows": [row(32, 90)]}}
        self.assertEqual(g.compile_order([1, 2, 4, 8, 16, 32], res), [8, 32, 16, 4, 2, 1])


class Report(unittest.TestCase):
    def res(self, **kw):
        res = {"started_utc": "2026-11-29T10:00:00+00:00", "batches": [1, 8], "dtype": "bf16", "diff_batch": 8,
               "kernels": "all", "finished": True,
               "turbine": {"kernels": "all", "device": "cuda:0 (H200)",
                           "rows": [row(1, 40, peak=10 << 30, latency=0.02), row(8, 120, peak=20 << 30)],
                           "failures": []},
               "eager": {"rows": [row(1, 45, peak=11 << 30), row(8, 70, peak=25 << 30)]},
               "compile": {"rows": [row(8, 100, peak=24 << 30)]},
               "pixel_diff": {"max": 3, "mean": 0.2, "images": [{}] * 8}}
        res.update(kw)
        return res

    def test_targets_met_and_not(self):
        t = g.targets(self.res())
        self.assertIn("= 1.71x (target >= 1.5x: met)", t)
        self.assertIn("120.00 / 100.00 (bs8) = 1.20x (target >= 1.0x: met)", t)
        # Batch-1 latency is the lone batch's (20 ms), not the overlapped interval (25 ms).
        self.assertIn("batch-1 latency: turbine 20.0 ms, eager 22.2 ms (target <=: met)", t)
        self.assertIn("at turbine's best batch size (bs8): turbine 20.0 GiB, eager 25.0 GiB at the same batch "
                      "size (target <=: met); eager at its own best (bs8): 25.0 GiB", t)
        # Different best batch sizes: memory is compared at turbine's, where eager measured it.
        apart = self.res(eager={"rows": [row(1, 45, peak=11 << 30), row(8, 40, peak=25 << 30)]},
                         turbine={"rows": [row(1, 40, peak=10 << 30), row(8, 120, peak=24 << 30)]})
        self.assertIn("turbine 24.0 GiB, eager 25.0 GiB at the same batch size (target <=: met); eager at "
                      "its own best (bs1): 11.0 GiB", g.targets(apart))
        only = self.res(eager={"rows": [row(1, 45, peak=11 << 30)]})
        self.assertIn("eager has no figure at bs8) (target <=: NOT met)", g.targets(only))
        self.assertIn("8 images of batch 8: max 3, mean 0.200 (8-bit) (target: mean <= 2.0: met)", t)
        slow = self.res(turbine={"rows": [row(1, 10, latency=0.1), row(8, 60, peak=30 << 30)]},
                        pixel_diff={"max": 90, "mean": 21.5, "images": [{}] * 8})
        t = g.targets(slow)
        self.assertEqual(t.count("NOT met"), 5, t)
        self.assertIn("max 90, mean 21.500 (8-bit) (target: mean <= 2.0: NOT met)", t)

    def test_edit_parity_is_judged_when_measured(self):
        self.assertNotIn("edits", g.targets(self.res()))
        t = g.targets(self.res(edit_pixel_diff={"max": 5, "mean": 0.61, "images": [{}] * 2}))
        self.assertIn("edits, turbine vs diffusers img2img (one step at strength 0.5, the same input and noise), "
                      "both bf16, 2 images: max 5, mean 0.610 (8-bit) (bound: mean <= 2.0: met)", t)
        t = g.targets(self.res(edit_pixel_diff={"max": 200, "mean": 40.0, "images": [{}] * 2}))
        self.assertIn("mean 40.000 (8-bit) (bound: mean <= 2.0: NOT met)", t)
        self.assertIn("edits against diffusers: no figure", g.targets(self.res(edit_pixel_diff=None)))

    def test_no_compile_figure_says_why(self):
        res = self.res(compile=None, compile_rc=124)
        self.assertIn("did not finish in the time left", g.targets(res))

    def test_fallback_failures_and_unfinished_runs_are_said(self):
        first = {"failures": [{"stage": "sweep", "batch": 1, "kernels": "all", "error": "CUDA_ERROR_ILLEGAL_ADDRESS"}]}
        res = self.res(kernels="none", finished=False, turbine_rc=1,
                       turbine_first={"kernels": "all", "rc": 1, "report": first},
                       kernel_tests={"summary": "0 of 1 test binaries passed"})
        md = g.render_md(res, args(), [1, 8], True)
        self.assertTrue(md.startswith("**Unfinished run**"), md)
        self.assertIn("turbine with `--kernels all` measured nothing (exit 1)", md)
        self.assertIn("turbine failed: sweep batch 1 with `--kernels all`: CUDA_ERROR_ILLEGAL_ADDRESS", md)
        self.assertIn("`--kernels none` (asked: auto)", md)
        self.assertIn("- CUDA kernel tests: 0 of 1 test binaries passed", md)
        self.assertIn("turbine exited with 1", md)
        self.assertIn("| 8 | 120.00 | 66.7 | 20.0 | 70.00 |", md)

    def test_host_queue_time_is_shown_when_measured(self):
        res = self.res()
        res["turbine"]["rows"][0]["host_queue_ms"] = 21.5
        md = g.render_md(res, args(), [1, 8], True)
        self.assertIn("against its ms/batch", md)
        self.assertIn("bs1 21.5 of 25.0 ms", md)
        self.assertNotIn("bs8 ", md.split("against its ms/batch")[1].split("\n")[0])

    def test_edits_are_shown_against_the_generations_when_asked(self):
        res = self.res()
        self.assertNotIn("- edits", g.render_md(res, args(), [1, 8], True))
        res["edits"] = {"rows": [row(1, 32.0), row(8, 64.0)]}
        res["edits_rc"] = 0
        md = g.render_md(res, args(), [1, 8], True)
        line = [x for x in md.splitlines() if x.startswith("- edits")][0]
        gen = {r["batch"]: r["images_per_s"] for r in res["turbine"]["rows"]}
        self.assertIn(f"bs1 32.00 images/s against {gen[1]:.2f} generating ({gen[1] / 32:.2f}x the time)", line)
        self.assertIn("bs8 64.00 images/s", line)
        res["edits"], res["edits_rc"] = None, 124
        md = g.render_md(res, args(), [1, 8], True)
        self.assertIn("- edits (strength 0.5): no figure (exit 124)", md)
        self.assertIn("edits exited with 124", md)

    def test_gpu_busy_share_is_shown_per_side_when_sampled(self):
        res = self.res()
        md = g.render_md(res, args(), [1, 8], True)
        self.assertNotIn("GPU busy", md)
        res["turbine"]["rows"][0]["gpu_busy_pct"] = 71.4
        res["turbine"]["rows"][1]["gpu_busy_pct"] = 99.2
        res["eager"]["rows"][1]["gpu_busy_pct"] = 88.0
        md = g.render_md(res, args(), [1, 8], True)
        line = [x for x in md.splitlines() if x.startswith("- GPU busy")][0]
        self.assertIn("turbine bs1 71%, bs8 99%; eager bs8 88%", line)

    def test_profile_and_ablation_tables(self):
        prof = {"kernels": "all", "batch": 8, "text_encode_ms": 8.0, "unet_ms": 40.0, "vae_decode_ms": 32.0,
                "entries": [{"stage": "unet", "kind": "conv", "ms": 16.0, "calls": 40},
                            {"stage": "vae_decode", "kind": "conv", "ms": 24.0, "calls": 30}]}
        res = self.res()
        res["turbine"]["profiles"] = [prof]
        res["eager"]["profile"] = {"batch": 8, "kinds_ms": {"conv": 48.0, "unattributed": 8.0}, "kernels_ms": 96.0}
        p = g.profile_table(res)
        self.assertIn("| conv | 5.000 | 6.000 |", p)
        self.assertIn("| other | 5.000 | 0.000 |", p)
        self.assertIn("| total | 10.000 | 12.000 |", p)
        abl = [{"kernels": "none", "row": row(8, 50), "max_diff_vs_none": 0, "mean_diff_vs_none": 0.0},
               {"kernels": "all", "row": row(8, 100), "max_diff_vs_none": 2, "mean_diff_vs_none": 0.1},
               {"kernels": "conv", "row": row(8, 60), "max_diff_vs_none": None, "mean_diff_vs_none": None}]
        res["turbine"]["ablation"] = abl
        a = g.ablation_table(res)
        self.assertIn("| all | 8 | 100.00 | 2.00x |", a)
        self.assertIn("| - | - |", a)
        md = g.render_md(res, args(), [1, 8], True)
        self.assertIn("by kind of layer", md)
        self.assertIn("one set at a time", md)

    def test_ablation_rows_with_roles(self):
        def abl(kernels, ips, role, lever=None):
            return {"kernels": kernels, "role": role, "lever": lever, "row": row(8, ips),
                    "max_diff_vs_none": 0, "mean_diff_vs_none": 0.0}

        res = self.res()
        # The set without each lever first, then the levers that work alone (flash needs
        # attention: it has no row of its own).
        res["turbine"]["ablation"] = [
            abl("none", 50, "none"), abl("all", 100, "all"),
            abl("attention,flash", 80, "without", "conv"), abl("conv,flash", 90, "without", "attention"),
            abl("conv,attention", 104, "without", "flash"), abl("conv", 60, "alone", "conv")]
        self.assertEqual(g.slower_levers(res), ["flash"])
        a = g.ablation_table(res)
        # all but conv: 12.5 ms/image against all's 10.0; conv alone: 20.0 - 16.67 against none.
        self.assertIn("| all but conv | attention,flash | 8 | 80.00 | 1.60x | 12.50 |", a)
        self.assertIn("| 2.50 |", a)
        self.assertIn("| conv alone | conv | 8 | 60.00 | 1.20x | 16.67 |", a)
        self.assertIn("| 3.33 | 2.50 |", a)
        self.assertIn("| all but flash | conv,attention |", a)
        # Truncated before any `alone` row: the `without` rows still name their levers.
        res["turbine"]["ablation"] = res["turbine"]["ablation"][:4]
        self.assertEqual(sorted(g.without_rows(res["turbine"]["ablation"])), ["attention", "conv"])

    def test_tuned_run_drops_slower_levers_and_can_hold_the_peak(self):
        def abl(kernels, ips):
            return {"kernels": kernels, "row": row(8, ips), "max_diff_vs_none": 0, "mean_diff_vs_none": 0.0}

        res = self.res()
        # all: 100; without flash: 105 (flash slows it down), without conv: 80, without geglu: 101
        # (within the 2% margin: kept).
        res["turbine"]["ablation"] = [
            abl("none", 50), abl("all", 100), abl("conv", 60), abl("flash", 55), abl("geglu", 51),
            abl("flash,geglu", 80), abl("conv,geglu", 105), abl("conv,flash", 101)]
        self.assertEqual(g.slower_levers(res), ["flash"])
        self.assertEqual(g.slower_levers(self.res()), [])
        # The tuned run at the sweep's best batch beats the sweep: it holds turbine's peak.
        res.update(tuned_kernels="all,-flash", tuned_rc=0, tuned={"rows": [row(8, 130, peak=19 << 30)]})
        best = g.turbine_best(res)
        self.assertEqual((best["run"], best["kernels"], best["images_per_s"]), ("tuned", "all,-flash", 130))
        t = g.targets(res)
        self.assertIn("from the tuned run, `--kernels all,-flash`", t)
        self.assertIn("with `all`: 120.00 images/s", t)
        self.assertIn("vs diffusers eager: turbine 130.00 (bs8)", t)
        self.assertIn("turbine 19.0 GiB, eager 25.0 GiB at the same batch size", t)
        md = g.render_md(res, args(), [1, 8], True)
        self.assertIn("- tuned run: `--kernels all,-flash`", md)
        self.assertIn("130.00 images/s at bs8, peak 19.0 GiB", md)
        # A slower tuned run leaves the sweep's peak in place.
        res["tuned"] = {"rows": [row(8, 110)]}
        self.assertEqual(g.turbine_best(res)["run"], "turbine")
        self.assertNotIn("from the tuned run", g.targets(res))
        res.update(tuned=None, tuned_rc=124)
        self.assertIn("no figure (exit 124)", g.render_md(res, args(), [1, 8], True))


if __name__ == "__main__":
    os.chdir(HERE)
    unittest.main()
