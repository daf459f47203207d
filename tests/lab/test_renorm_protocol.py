"""Issue 17's fix of ``renorm``: its non-i.i.d. batches (training, and the test batches measured in
training mode) hold labels of at most ``classes_per_batch`` classes, where labels drawn from all
of a 10-class data set's classes made them nearly i.i.d."""

import pytest
import torch

from normkit.errors import ConfigError
from normkit.lab import get_experiment, load_dataset
from normkit.lab.batch_orders import PairedBatches, paired_test_order
from normkit.lab.plan import Trial


def labels(count=400, classes=10):
    return torch.arange(count) % classes


@pytest.mark.parametrize("k", [2, 3, 4])
def test_pair_batches_hold_at_most_k_classes_and_stay_pairs(k):
    y = labels()
    order = PairedBatches(y, 20, seed=1, classes_per_batch=k)
    seen = set()
    for _ in range(50):
        index = order.next()
        assert len(set(y[index].tolist())) <= k
        assert torch.equal(y[index[:10]], y[index[10:]]) and (index[:10] != index[10:]).all()
        seen |= set(y[index].tolist())
    assert seen == set(range(10))  # every class takes its turn
    drawn_from_all = PairedBatches(y, 20, seed=1)
    assert max(len(set(y[drawn_from_all.next()].tolist())) for _ in range(50)) > 4
    with pytest.raises(ConfigError, match="classes_per_batch"):
        PairedBatches(y, 20, seed=1, classes_per_batch=0)


def test_grouped_test_order_uses_each_image_once_in_batches_of_at_most_k_classes():
    y = labels(1000)
    order = paired_test_order(y, pairs_per_batch=10, seed=0, classes_per_batch=2)
    assert len(set(order.tolist())) == len(order) and len(order) >= 0.8 * len(y)
    for batch in order.view(-1, 20):
        assert len(set(y[batch].tolist())) <= 2 and torch.equal(y[batch[:10]], y[batch[10:]])
    assert torch.equal(order, paired_test_order(y, 10, seed=0, classes_per_batch=2))  # seeded


def test_the_experiment_trains_its_non_iid_arms_on_batches_of_few_classes():
    experiment = get_experiment("renorm")
    settings = experiment.settings("tiny", {"dataset": "digits"})
    full = experiment.settings()
    assert 2 <= full.classes_per_batch <= 4 and full.classes_per_batch == settings.classes_per_batch
    data = experiment.prepare_data(settings, load_dataset("digits"))
    batch = 2 * settings.pair_labels
    for arm, paired in (("noniid-bn", True), ("noniid-brn", True), ("noniid-bn-iid", False)):
        params = {"arm": arm, "run": "noniid", "normalizer": "bn", "replicate": 0}
        setup = experiment.setup(Trial(f"{arm}/seed=0", params, 4, 2, 0), settings, data,
                                 torch.Generator().manual_seed(0))  # fmt: skip
        assert (setup.batch_order is not None) == paired
        if paired:
            order = setup.batch_order(data.y_train, batch, 0)
            for _ in range(20):
                assert len(set(data.y_train[order.next()].tolist())) <= settings.classes_per_batch
