"""Command-line tools around training: ``plan`` (memory planning before a run) and ``report``
(plots of a run's metrics after it). Each module has ``add_arguments(parser)`` and ``run(args)``
for the ``hp-deepspeed`` CLI, over pure functions that tests and notebooks call directly."""
