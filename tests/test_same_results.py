"""benchmarks/same_results.py's comparison: two runs' metrics.jsonl records agree exactly to the printed digits."""

from benchmarks.same_results import compare, printed, summary


def record(epoch, loss, knn, area=None):
    return {"epoch": epoch, "loss": loss, "knn_top1": knn, "images_per_sec": 100.0 * epoch, "box_area": area}


def test_printed_digits_are_what_the_run_prints():
    assert printed(record(1, 9.123449, 0.416666, 0.51234)) == {
        "loss": "9.1234",
        "knn_top1": "41.67%",
        "box_area": "0.512",
    }
    assert printed(record(0, None, None)) == {"loss": "-", "knn_top1": "-", "box_area": "-"}


def test_runs_agreeing_to_the_printed_digits_are_the_same():
    base = [record(0, None, 0.25), record(1, 9.12341, 0.41666, 0.5)]
    tree = [record(0, None, 0.25), record(1, 9.12344, 0.416664, 0.5001)]  # and a different throughput
    tree[1]["images_per_sec"] = 1.0
    assert compare(base, tree) == []


def test_each_differing_digit_is_named():
    base = [record(0, None, 0.25), record(1, 9.1234, 0.4166, 0.5)]
    tree = [record(0, None, 0.2501), record(1, 9.1236, 0.4166, 0.51)]
    assert compare(base, tree) == [
        "epoch 0: knn_top1 25.00% at BASE, 25.01% here",
        "epoch 1: loss 9.1234 at BASE, 9.1236 here",
        "epoch 1: box_area 0.500 at BASE, 0.510 here",
    ]


def test_a_missing_value_or_epoch_differs():
    assert compare([record(1, 9.0, 0.5)], [record(1, 9.0, None)]) == ["epoch 1: knn_top1 50.00% at BASE, - here"]
    assert compare([record(0, None, 0.5), record(1, 9.0, 0.5)], [record(0, None, 0.5)]) == [
        "2 epoch records at BASE, 1 here"
    ]


def test_summary_shows_the_compared_digits():
    records = [record(0, None, 0.25), record(1, 9.12346, 0.5, 0.4)]
    assert summary(records) == "loss - 9.1235 | kNN 25.00% 50.00% | box area 0.400"
