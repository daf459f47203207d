"""Which normalizer to use: the guideline as one table, with the reason for each row.

The rule, by the kind of task and the per-device batch (the number of samples one BatchNorm sees):

| task | batch per device | use | why |
|---|---|---|---|
| vision | ≥ 16 | BatchNorm | best accuracy when the batch is large enough for its statistics |
| vision | < 16 | GroupNorm (32 groups) | independent of the batch; BN degrades as the batch shrinks |
| sequence | any | LayerNorm | per-sample statistics: no batch or time-step dependence |
| style | any | InstanceNorm | removes each image's contrast, which stylisation needs |

The numbers behind it: ResNet-50 on ImageNet, validation error by images per GPU (Wu & He 2018,
Fig. 1 and Table 2): BN 23.6 / 23.7 / 24.8 / 27.3 / 34.7 at 32 / 16 / 8 / 4 / 2, GN 24.1 to 24.2
throughout. :data:`ADVICE_TABLE` is the table; :func:`advise` picks its row; :func:`guess_task`
reads the task from a model's layers when it is not given. The doctor and the lab both read it
from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from normkit.errors import ConfigError

TASKS = ("vision", "sequence", "style")
SMALL_BATCH = 16  # per device; below it BatchNorm loses accuracy (Wu & He 2018, Fig. 1)
_ALIASES = {
    "image": "vision",
    "images": "vision",
    "detection": "vision",
    "segmentation": "vision",
    "classification": "vision",
    "text": "sequence",
    "language": "sequence",
    "nlp": "sequence",
    "audio": "sequence",
    "rnn": "sequence",
    "transformer": "sequence",
    "style_transfer": "style",
    "stylization": "style",
    "generation": "style",
}


@dataclass(frozen=True)
class Advice:
    """One row of the guideline: the normalizer to use and why.

    ``spec`` is a :func:`normkit.create_norm` spec (``nk.tools.convert(model, advice.spec)`` applies
    it); ``layer`` names the layer; ``source`` the evidence.
    """

    task: str
    batches: str  # which per-device batch sizes the row covers
    spec: str
    layer: str
    reason: str
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


ADVICE_TABLE: tuple[Advice, ...] = (
    Advice(
        "vision",
        f">= {SMALL_BATCH}",
        "batch",
        "BatchNorm2d",
        "with enough samples per device BatchNorm's statistics are reliable and it gives the best "
        "accuracy (ResNet-50: 23.6% error at 32 images per GPU vs GroupNorm 24.1%)",
        "Ioffe & Szegedy 2015; Wu & He 2018, Tables 1 and 2",
    ),
    Advice(
        "vision",
        f"< {SMALL_BATCH}",
        "group:32",
        "GroupNorm(32)",
        "BatchNorm's error grows as the per-device batch shrinks (ResNet-50: 24.8% at 8, 27.3% at 4, "
        "34.7% at 2 images per GPU) while GroupNorm's stays at 24.1-24.2%; SyncBatchNorm is the "
        "alternative when devices can share statistics",
        "Wu & He 2018, Fig. 1 and Table 2",
    ),
    Advice(
        "sequence",
        "any",
        "layer",
        "LayerNorm",
        "statistics of each sample over its features: the same in training and inference, works "
        "with batch size 1 and needs no per-time-step statistics in recurrent networks",
        "Ba, Kiros & Hinton 2016",
    ),
    Advice(
        "style",
        "any",
        "instance",
        "InstanceNorm2d",
        "normalizing each image and channel removes instance-specific contrast, which markedly "
        "improves stylisation (but is the weakest for classification: 28.4% vs BN 23.6%)",
        "Ulyanov, Vedaldi & Lempitsky 2016; Wu & He 2018, Table 1",
    ),
)


def canonical_task(task: str) -> str:
    """``task`` as one of :data:`TASKS` (accepting a few synonyms); ConfigError otherwise."""
    name = str(task).strip().lower().replace("-", "_").replace(" ", "_")
    name = _ALIASES.get(name, name)
    if name not in TASKS:
        raise ConfigError(
            f"unknown task {task!r}; use one of {', '.join(TASKS)} (or a synonym: "
            f"{', '.join(sorted(_ALIASES))})"
        )
    return name


def advise(task: str, batch_size: int | None = None) -> Advice:
    """The guideline's row for ``task`` and a per-device ``batch_size`` (needed for vision).

    Example::

        >>> advise("vision", batch_size=4).spec, advise("vision", batch_size=64).spec
        ('group:32', 'batch')
        >>> advise("sequence").layer
        'LayerNorm'
    """
    task = canonical_task(task)
    if task != "vision":
        return next(row for row in ADVICE_TABLE if row.task == task)
    if batch_size is None:
        raise ConfigError(
            "the advice for vision depends on the per-device batch size; pass batch_size "
            "(normkit doctor: --batch-size)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    small = batch_size < SMALL_BATCH
    return ADVICE_TABLE[1] if small else ADVICE_TABLE[0]


_SEQUENCE_LAYERS = (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention, nn.Embedding,
                    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # fmt: skip
_VISION_LAYERS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def guess_task(model: nn.Module) -> str | None:
    """``"sequence"`` when the model has recurrent, attention or embedding layers, ``"vision"`` when
    it has 2-D/3-D convolutions, else None. Style transfer cannot be told from the layers."""
    modules = list(model.modules())
    if any(isinstance(m, _SEQUENCE_LAYERS) for m in modules):
        return "sequence"
    if any(isinstance(m, _VISION_LAYERS) for m in modules):
        return "vision"
    return None
