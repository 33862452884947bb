"""One training run: the step loop and the services it composes.

``loop`` (the loop, composition only), ``run`` (one rank's ``Run``: build, resume, save),
``services`` (global rank 0's engine, data, rewards, evaluation), ``weight_sync`` (actor -> engine
or HF directory), ``experience`` (one step's rollout phase), ``ahead`` (generation ahead of
training), ``tracking`` (metrics logging). Imported only by the commands (``cli``,
``evaluation``), never by the layers below.
"""
