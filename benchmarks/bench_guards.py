"""Benchmark: the model guards' forward passes and CPU time on tiny random models, before and after, side by side.

- LlavaGuard (a tiny LLaVA-OneVision, its architecture): the two-pass method (generate the answer, then one more
  forward pass over the whole prompt with the answer prefilled up to the rating, to score it) vs the guard's one
  pass (the rating's probability read from the first step of the one ``generate`` call). Forward passes over the
  prompt are counted per image (2 -> 1); the decode steps of one token each are the same in both.
- ShieldGemma 2 (tiny random): one image per forward pass (the old loop) vs the guard's batched forward (every image
  checked against the same categories in one pass); images per forward pass are counted.

On a real 7B LlavaGuard the prompt is ~8.5k tokens, so the saved pass is most of a row's prefill; on the tiny models
the per-token cost is small and the fixed per-step costs weigh more, so the CPU ratio here understates it.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src:tests python benchmarks/bench_guards.py [--n 8] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("src", "tests", "benchmarks")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

from harness import interleaved, load_line, print_overhead  # noqa: E402


class PromptPasses:
    """Counts the rows a model's forward passes run over more than one position (prompt passes, not decode steps)."""

    def __init__(self, model) -> None:
        self.rows = 0
        self.calls = 0
        self.positions = 0  # the longest prompt pass, in positions (padding included)
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        if ids.shape[1] > 1:
            self.rows += ids.shape[0]
            self.calls += 1
            self.positions = max(self.positions, ids.shape[1])


def _photos(n: int):
    from safetypairs.sources import DEMO_PHOTOS, demo_photo

    return [demo_photo(DEMO_PHOTOS[i % len(DEMO_PHOTOS)]).resize((64, 48)).rotate(7 * i) for i in range(n)]


def bench_llavaguard(folder: Path, n: int, tokens: int, rounds: int) -> None:
    """Two-pass vs one-pass LlavaGuard on ``n`` images in one batch, ``tokens`` new tokens each."""
    import torch
    from tiny_models import build_tiny_llava_onevision

    from safetypairs.backends.registry import load_backend
    from safetypairs.backends.vlm_guards import LLAVAGUARD_RATING_PREFIX, render_guard_prompt
    from safetypairs.policy import load_policy

    policy = load_policy("llavaguard")
    guard = load_backend("guards", f"llavaguard:{build_tiny_llava_onevision(folder / 'ov')},max_new_tokens={tokens}")
    vlm = guard.vlm
    images, categories = _photos(n), [None] * n
    prompts = [render_guard_prompt("llavaguard", policy, c) for c in categories]

    def two_pass(_round: int) -> None:
        """The method before: generate, then a second forward over the prompt with the rating prefix."""
        vlm.generate(images, prompts, tokens)
        texts = [vlm.prompt_text(p, LLAVAGUARD_RATING_PREFIX) for p in prompts]
        inputs = vlm.processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            vlm.model(**inputs, logits_to_keep=1)

    passes = PromptPasses(vlm.model)
    two_pass(0)
    before = passes.rows / n
    passes.rows = 0
    guard.classify(images, categories, policy)
    after = passes.rows / n
    print(f"LlavaGuard forwards over the prompt per image: two-pass {before:g}, one-pass {after:g} "
          f"({n} images per batch, prompts of {passes.positions} positions, {tokens} new tokens)")
    seconds = interleaved({"two-pass": two_pass, "one-pass": lambda r: guard.classify(images, categories, policy)},
                          rounds)
    print_overhead("LlavaGuard one pass vs two (tiny LLaVA-OneVision, CPU)", seconds, "two-pass", 0.9)


def bench_shieldgemma2(folder: Path, n: int, rounds: int) -> None:
    """ShieldGemma 2 one image per forward vs the guard's batched forward, ``n`` images, every category."""
    import torch
    from tiny_models import build_tiny_shieldgemma2

    from safetypairs.backends.registry import load_backend
    from safetypairs.policy import load_policy, render_policy

    policy = load_policy("llavaguard")
    guard = load_backend("guards", f"shieldgemma2:{build_tiny_shieldgemma2(folder / 'sg2')}")
    images, categories = _photos(n), [None] * n
    custom = {c: render_policy(policy, [c], style="shieldgemma2") for c in policy.categories}

    def one_at_a_time(_round: int) -> None:
        """The loop before: one processor call and one forward pass per image."""
        for image in images:
            inputs = guard.processor(images=[image], policies=list(policy.categories), custom_policies=custom,
                                     return_tensors="pt")
            with torch.inference_mode():
                guard.model(**inputs)

    passes = PromptPasses(guard.model)
    one_at_a_time(0)
    before = n / passes.calls
    passes.calls = 0
    guard.classify(images, categories, policy)
    after = n / passes.calls
    print(f"ShieldGemma 2 images per forward: one at a time {before:g}, batched {after:g} "
          f"({len(policy.categories)} policies per image)")
    seconds = interleaved({"one at a time": one_at_a_time,
                           "batched": lambda r: guard.classify(images, categories, policy)}, rounds)
    print_overhead("ShieldGemma 2 batched vs one at a time (tiny, CPU)", seconds, "one at a time", 0.8)


def main() -> None:
    """Run both parts and print the counts and the CPU-time ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="images per guard call (evaluate's default batch)")
    parser.add_argument("--tokens", type=int, default=32, help="LlavaGuard new tokens per answer")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(load_line())
    with tempfile.TemporaryDirectory() as tmp:
        bench_llavaguard(Path(tmp), args.n, args.tokens, args.rounds)
        bench_shieldgemma2(Path(tmp), args.n, args.rounds)


if __name__ == "__main__":
    main()
