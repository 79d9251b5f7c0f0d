"""The command-line tools: ``gen_data`` (teacher data), ``main`` (learn a discretization), ``sample``.

Each module has ``main(argv)`` (returns the folder it wrote, raises ``UserError``) and ``cli()``
(the console script: one line and exit status 2 on a user's mistake). ``gen_data.py``, ``main.py``
and ``sample.py`` at the top of the checkout run them as the paper's commands.
"""
