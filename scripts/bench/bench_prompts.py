"""The benchmarks' prompts, shared by diffusers_ref.py, gpu_check.py and serve_check.py (stdlib
only: gpu_check and serve_check run without torch)."""

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolour painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting, 35mm",
    "an isometric pixel-art city at night",
]


def prompt_at(i, prompts=PROMPTS):
    """Image i's prompt by `turbine bench`'s rule (`batch_items`): prompts[i % P], with
    ", variation K" appended from the second round on (K = i // P). Every image of a batch (and
    every request of a load test) gets its own prompt, so the text encoders do a whole batch's
    work: turbine encodes a repeated prompt once and keeps recent prompts' embeddings."""
    n = len(prompts)
    return prompts[i] if i < n else f"{prompts[i % n]}, variation {i // n}"


def batch_prompts(b, prompts=PROMPTS):
    """The prompts of a batch of `b` (see `prompt_at`)."""
    return [prompt_at(i, prompts) for i in range(b)]
