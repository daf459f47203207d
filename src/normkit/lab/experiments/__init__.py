"""The lab's experiments, one file each; every module here is imported by the registry, so adding a
file with an ``@register``-ed :class:`normkit.lab.experiment.Experiment` is all a new one takes."""
