"""Attribution from the command line: configs (``config``), models and data from disk (``loaders``), the
``fit``/``score`` commands (``commands``) and ``inspect`` (``inspect``)."""
