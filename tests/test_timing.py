"""The one timer: interleaved rounds in ABBA order after warm-up rounds."""
import torch

from hclafter.core.timing import interleaved, per_image_ms, timing_noise


def test_interleaved_rounds_alternate_order_after_the_warmup():
    calls = []
    times = interleaved([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3, device=torch.device("cpu"),
                        warmup=2)
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)


def test_per_image_median_and_noise():
    assert per_image_ms([0.1, 0.3, 0.2], batch=4) == 50.0
    assert timing_noise([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]]) == 1.0
