import math

import numpy as np

from pipeline.crop_plan import crop_plan, epoch_order, random_resized_crop


def test_windows_inside_image_with_scale_and_ratio_in_range():
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(20, 600, 5000), rng.integers(20, 600, 5000)
    top, left, h, w = random_resized_crop(heights, widths, rng).T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    area = h * w / (heights * widths)
    ratio = w / h
    # Rounding to whole pixels moves area/ratio slightly outside the continuous range on small images.
    big = (heights >= 200) & (widths >= 200)
    assert area[big].min() >= 0.19 and area[big].max() <= 1.0
    inside = (ratio[big] >= 3 / 4 - 0.02) & (ratio[big] <= 4 / 3 + 0.02)
    assert inside.all()
    # The area fraction is spread over the whole range, not stuck at one end.
    assert np.quantile(area[big], 0.1) < 0.35 and np.quantile(area[big], 0.9) > 0.7


def test_extreme_aspect_falls_back_to_central_crop():
    heights, widths = np.array([10, 400]), np.array([400, 10])
    top, left, h, w = random_resized_crop(heights, widths, np.random.default_rng(1)).T
    assert h[0] == 10 and w[0] == round(10 * 4 / 3) and left[0] == (400 - w[0]) // 2
    assert w[1] == 10 and h[1] == round(10 * 4 / 3) and top[1] == (400 - h[1]) // 2


def test_plan_is_reproducible_and_differs_per_epoch():
    heights, widths = np.full(50, 32), np.full(50, 48)
    a, b = crop_plan(heights, widths, seed=3, epoch=1), crop_plan(heights, widths, seed=3, epoch=1)
    assert a.shape == (50, 2, 4) and a.dtype == np.int64 and np.array_equal(a, b)
    assert not np.array_equal(a, crop_plan(heights, widths, seed=3, epoch=2))
    assert not np.array_equal(a[:, 0], a[:, 1])  # two views, two windows
    order = epoch_order(50, 3, 1)
    assert sorted(order.tolist()) == list(range(50)) and np.array_equal(order, epoch_order(50, 3, 1))


def test_ratio_distribution_is_log_uniform():
    rng = np.random.default_rng(2)
    _, _, h, w = random_resized_crop(np.full(20000, 1000), np.full(20000, 1000), rng).T
    log_ratio = np.log(w / h)
    assert abs(np.median(log_ratio)) < 0.02
    assert math.isclose(np.mean(log_ratio < 0), 0.5, abs_tol=0.02)
