"""The benchmarks' prompt rule must be `turbine bench`'s (`batch_items` in src/cli/bench.rs, whose
unit test `items_cycle_distinct_prompts_and_latent_rows_cycle` asserts the same list): diffusers
and turbine must be given the same prompts.

    python3 -m unittest discover -s scripts/bench -p 'test_*.py'
"""

import unittest

import bench_prompts as p


class Rule(unittest.TestCase):
    def test_the_rule_is_turbine_bench_s(self):
        self.assertEqual(p.batch_prompts(5, ["a", "b"]),
                         ["a", "b", "a, variation 1", "b, variation 1", "a, variation 2"])

    def test_every_image_of_a_batch_has_its_own_prompt_and_the_first_round_is_unchanged(self):
        b = p.batch_prompts(32)
        self.assertEqual(len(set(b)), 32)
        self.assertEqual(b[:4], p.PROMPTS)
        self.assertEqual(p.prompt_at(37), p.PROMPTS[1] + ", variation 9")


if __name__ == "__main__":
    unittest.main()
